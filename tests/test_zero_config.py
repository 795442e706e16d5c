"""ZeRO's gradient reduction: overlapped with the backward, in buckets sized from the config
(``train.zero_overlap_comm``, ``train.zero_bucket_size``; hpc_mim/distributed/deepspeed.py)."""
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from hpc_mim.config import TrainConfig
from hpc_mim.distributed.env import free_port


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_sections_overlap_and_use_the_configured_buckets(stage):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from hpc_mim.distributed.deepspeed import ds_config
    cfg = TrainConfig(batch_size=64, micro_batch_size=32, zero_stage=stage, zero_bucket_size=12_345_679)
    section = ds_config(cfg, world_size=2)["zero_optimization"]
    parsed = DeepSpeedZeroConfig(**section)           # DeepSpeed's own schema: no unknown key
    assert parsed.stage == stage and parsed.overlap_comm is True and parsed.contiguous_gradients
    assert parsed.reduce_bucket_size == 12_345_679
    if stage == 3:
        assert parsed.prefetch_bucket_size == 12_345_679
    else:   # DeepSpeed asserts an even all-gather bucket (4-byte alignment of fp16 elements)
        assert parsed.allgather_bucket_size == 12_345_680
    off = ds_config(TrainConfig(zero_stage=stage, zero_overlap_comm=False), 1)["zero_optimization"]
    assert DeepSpeedZeroConfig(**off).overlap_comm is False


def test_without_zero_no_zero_keys():
    from hpc_mim.distributed.deepspeed import ds_config
    assert ds_config(TrainConfig(zero_stage=0), 1)["zero_optimization"] == {"stage": 0}


def zero_worker(rank: int, port: int, out: dict) -> None:
    import deepspeed.comm as ds_comm

    from hpc_mim.distributed import deepspeed as ds
    from hpc_mim.distributed.env import DistEnv
    torch.set_num_threads(1)
    ds.init_distributed(DistEnv(rank=rank, world_size=2, local_rank=rank, local_world_size=2,
                                master_port=port), torch.device("cpu"), 30, 120)
    all_reduce, calls = ds_comm.all_reduce, []
    ds_comm.all_reduce = lambda tensor, *a, **k: calls.append(tensor.numel()) or all_reduce(tensor, *a, **k)
    # DeepSpeed's defaults, in effect before (no overlap, 5e8-element buckets), vs ours with
    # buckets of 1,000 elements for the MLP's 5,508 gradients
    for name, overlap, bucket in (("defaults", False, 500_000_000), ("overlap", True, 1000)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        cfg = TrainConfig(batch_size=8, micro_batch_size=2, zero_stage=2, zero_overlap_comm=overlap,
                          zero_bucket_size=bucket)        # 2 ranks x 2 x accumulation 2
        engine = ds.initialize(model, optimizer, cfg, world_size=2)
        torch.manual_seed(1 + rank)                       # each rank its own data
        reductions = []
        for _ in range(3 * 2):                            # 3 optimizer steps
            loss = engine(torch.randn(2, 16)).square().mean()
            calls.clear()
            engine.backward(loss)
            reductions.append(list(calls))
            engine.step()
        out[(rank, name)] = {"overlap": engine.optimizer.overlap_comm,
                             "bucket": engine.optimizer.reduce_bucket_size, "reductions": reductions,
                             "start": start,
                             "end": [p.detach().clone() for p in engine.module.parameters()]}
    ds_comm.all_reduce = all_reduce
    ds.dist.destroy_process_group()


def test_overlapped_small_buckets_train_exactly_like_deepspeeds_defaults_on_gloo():
    """Two CPU ranks, ZeRO-2, gradient accumulation 2. DeepSpeed accepts overlap_comm on its CPU
    accelerator (no side stream there: each full bucket is all-reduced in the backward hook
    that fills it); the gradients go in several all-reduces per backward instead of one after
    it, and the weights after 3 steps are bit-identical to DeepSpeed's defaults'."""
    out = mp.Manager().dict()
    mp.spawn(zero_worker, args=(free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        ours, theirs = out[(rank, "overlap")], out[(rank, "defaults")]
        assert (ours["overlap"], ours["bucket"]) == (True, 1000)
        assert (theirs["overlap"], theirs["bucket"]) == (False, 500_000_000)
        # every micro-batch (ZeRO-2 partitions gradients): all 5,508 at once, or in buckets
        assert all(sizes == [5508] for sizes in theirs["reductions"]), theirs["reductions"]
        for sizes in ours["reductions"]:
            assert sum(sizes) == 5508 and len(sizes) >= 4 and max(sizes) <= 4160, sizes
        assert all(torch.equal(a, b) for a, b in zip(ours["end"], theirs["end"]))
        assert all(torch.equal(a, b) for a, b in zip(ours["end"], out[(0, "overlap")]["end"]))
        assert not any(torch.equal(a, b) for a, b in zip(ours["end"], ours["start"]))  # it trained
