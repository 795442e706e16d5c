"""What an 8-node bf16 GPU run would execute, checked where a CPU can show it.

One bf16 LUT run (the method with an EMA teacher and synced BatchNorm heads) in a child process,
instrumented: every tensor handed to a collective, every host sync of the loop, the teacher's
update, the exported weights, then bf16 fine-tuning of the export. The GPU-only halves (NCCL,
the CUDA generator in checkpoints) are in tests/gpu/.
"""
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO
from hpc_mim.distributed.env import free_port
from test_checkpoint import make_run

STEPS, LOG_EVERY = 4, 2

INSTRUMENTED_RUN = r"""
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from conftest import HostSyncs
from hpc_mim.config import read_config
from hpc_mim.distributed.env import DistEnv, free_port
from hpc_mim.methods.ema import cosine_momentum
from hpc_mim.models.vit import load_encoder
from hpc_mim.rundir import RunDir
from hpc_mim.train.trainer import Trainer

run = RunDir(sys.argv[1])
trainer = Trainer(read_config(run.config), run, env=DistEnv(master_port=free_port()))
method = trainer.engine.module
report = {"device": str(trainer.device), "collectives": [], "ema": []}

all_reduce = dist.all_reduce
def recording(tensor, *args, **kwargs):
    caller = sys._getframe(1).f_code.co_filename
    report["collectives"].append([caller.split("/")[-1], str(tensor.device), str(tensor.dtype)])
    return all_reduce(tensor, *args, **kwargs)
dist.all_reduce = recording

update = method.on_optimizer_step
def checked_update(progress):
    before = [p.detach().clone() for p in method.teacher.copies.parameters()]
    student = [p.detach().clone() for name in ("encoder", "projector")
               for p in getattr(method, name).parameters()]
    update(progress)
    m = cosine_momentum(method.base_momentum, progress)
    after = list(method.teacher.copies.parameters())
    fp32_step = [(1 - m) * (s - b) for s, b in zip(student, before)]
    report["ema"].append({
        "dtypes": sorted({str(p.dtype) for p in after}),
        "error": max((a - b - d).abs().max().item() for a, b, d in zip(after, before, fp32_step)),
        "moved": max((a - b).abs().max().item() for a, b in zip(after, before)),
        "fp32_step": max(d.abs().max().item() for d in fp32_step)})
method.on_optimizer_step = checked_update

loop = trainer.loop
def counted_loop(*args):                   # the training loop's syncs, not the export's
    syncs = HostSyncs()
    loop(*args)
    report["syncs"] = dict(syncs.sites)
trainer.loop = counted_loop
trainer.fit()
dist.all_reduce = all_reduce               # pre-training's collectives only
exported = load_encoder(run.encoder).state_dict()
live = method.encoder.state_dict()
report["export_equal"] = all(torch.equal(exported[k], live[k].float()) for k in exported)
weights = torch.cat([v.flatten() for v in exported.values()])
report["export_dtypes"] = sorted({str(v.dtype) for v in exported.values()})
report["export_not_bf16"] = (weights != weights.bfloat16().float()).float().mean().item()
report["bn_stat_dtypes"] = sorted({str(m.running_var.dtype) for m in method.modules()
                                   if isinstance(m, torch.nn.BatchNorm1d)})

from evaluation import finetune
report["finetune"] = finetune.main(str(run.root), overrides=["eval.finetune.precision=bf16"])
print("REPORT " + json.dumps(report))
"""


def test_bf16_lut_run_keeps_teacher_statistics_losses_and_export_fp32(tmp_path, data_root):
    run, _, _ = make_run(tmp_path, [f"data.root={data_root}", "train.precision=bf16",
                                    f"train.max_steps={STEPS}", f"train.log_every={LOG_EVERY}"],
                         method="lut")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    r = subprocess.run([sys.executable, "-c", INSTRUMENTED_RUN, str(run.root), str(REPO / "tests")],
                       capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.split("REPORT ", 1)[1])

    # every tensor our code hands to a collective lives on the training device, fp32
    ours = [c for c in report["collectives"] if c[0] == "loop.py"]
    assert len(ours) == STEPS + STEPS // LOG_EVERY                 # agree per step + each log
    assert {(d, t) for _, d, t in ours} == {(report["device"], "torch.float32")}
    assert {d for _, d, _ in report["collectives"]} == {report["device"]}

    # host syncs of the loop: one per step (agree) and one per log point, none per micro-batch;
    # and one per collapse point (hpc_mim/train/collapse.py: at the log points before the end)
    loop_syncs = report["syncs"]
    ours = {site: n for site, n in loop_syncs.items() if site.startswith("hpc_mim/train/loop.py")}
    collapse = {site: n for site, n in loop_syncs.items() if site.startswith("hpc_mim/train/collapse.py")}
    assert sum(ours.values()) == STEPS + STEPS // LOG_EVERY, loop_syncs
    assert sum(collapse.values()) == STEPS // LOG_EVERY - 1, loop_syncs
    assert len(ours) + len(collapse) == len(loop_syncs), loop_syncs

    # the EMA teacher is fp32 and moves by exactly the fp32 momentum step (bf16 rounds it away)
    assert len(report["ema"]) == STEPS
    # (step 1 has lr 0 in warmup, the last has momentum 1: nothing to follow there)
    for ema in report["ema"]:
        assert ema["dtypes"] == ["torch.float32"] and ema["error"] < 1e-7
        assert abs(ema["moved"] - ema["fp32_step"]) <= 0.1 * ema["fp32_step"]  # bf16: 0 or ~1e-3
    assert sum(ema["moved"] > 0 for ema in report["ema"]) == STEPS - 2

    # the synced BatchNorm heads keep fp32 running statistics
    assert report["bn_stat_dtypes"] == ["torch.float32"]

    # the export is the fp32 training weights, not a bf16 copy of them
    assert report["export_equal"] and report["export_dtypes"] == ["torch.float32"]
    assert report["export_not_bf16"] > 0.9

    # fine-tuning with eval.finetune.precision bf16 runs (fp32 images into an autocast forward)
    top1 = report["finetune"]["pretrained"]["top1"]
    assert 0 <= top1 <= 100


def collective_worker(rank: int, port: int, out: dict) -> None:
    from hpc_mim.distributed import deepspeed as ds
    from hpc_mim.distributed.env import DistEnv
    import torch.distributed as dist
    env = DistEnv(rank=rank, world_size=2, master_port=port)
    ds.init_distributed(env, torch.device("cpu"), rendezvous_timeout_s=4, collective_timeout_s=120)
    if rank == 0:
        time.sleep(7)                  # rank-0-only work: MLflow, checkpoint pruning, fsync
    t = torch.ones(1) * (rank + 1)
    start = time.time()
    dist.all_reduce(t)
    out[rank] = (t.item(), time.time() - start)
    dist.destroy_process_group()


def test_a_collective_waits_past_the_rendezvous_timeout():
    """Rank 1 waits 7 s in an all-reduce for rank 0; the rendezvous timeout (4 s) does not
    apply to collectives, so the job lives (a single timeout would have killed it)."""
    port = free_port()
    out = mp.Manager().dict()
    mp.spawn(collective_worker, args=(port, out), nprocs=2, join=True)
    assert out[0][0] == out[1][0] == 3.0
    assert out[1][1] > 5                # it really waited longer than the rendezvous timeout


def test_each_task_finds_its_own_gpu_with_or_without_slurm_gpu_binding():
    from hpc_mim.distributed.env import cuda_index
    assert cuda_index(local_rank=5, visible=8) == 5          # --gpus-per-node 8: all visible
    assert cuda_index(local_rank=5, visible=1) == 0          # --gpus-per-task 1: its own one
    with pytest.raises(RuntimeError, match="local rank 3 has no GPU of its own: 2 visible"):
        cuda_index(local_rank=3, visible=2)


class CudaLikeAccelerator:
    """What DeepSpeed's CUDA accelerator does with a device index, recorded instead of done."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def is_available(self) -> bool:
        return True

    def set_device(self, index) -> None:
        self.calls.append(("deepspeed", int(index)))

    def device_name(self, index=None) -> str:
        return "cuda" if index is None else f"cuda:{int(index)}"


@pytest.mark.parametrize("visible, expected", [(1, 0), (8, 5)])
def test_deepspeed_drives_the_gpu_the_project_chose(monkeypatch, request, visible, expected):
    """Local rank 5 of 8 on a node where SLURM binds one GPU per task (1 visible: its index is
    0) or shows all 8 (index 5). The project picks the device (``training_device``), then
    exports the environment (``init_distributed``); DeepSpeed derives its own device from that
    environment in the functions called here (the engine's, the communication layer's and
    ZeRO's reads of LOCAL_RANK) and must land on the same GPU: ``set_device(5)`` with one
    visible GPU is "invalid device ordinal". CUDA is simulated: torch.cuda reports ``visible``
    devices and records what is made current."""
    import deepspeed.comm as ds_comm
    import deepspeed.runtime.engine as ds_engine
    from deepspeed.comm.utils import get_local_rank_from_launcher
    from deepspeed.runtime.engine import DeepSpeedEngine

    from hpc_mim.distributed import deepspeed as ds
    from hpc_mim.distributed.env import DistEnv, cuda_index, detect, training_device
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")                 # restored (or removed) after the test
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    request.addfinalizer(lambda: (setattr(torch.backends.cuda.matmul, "allow_tf32", tf32[0]),
                                  setattr(torch.backends.cudnn, "allow_tf32", tf32[1])))
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("torch", torch.device(d).index)))

    env = DistEnv(rank=13, world_size=16, local_rank=5, local_world_size=8)
    device = training_device(env)
    assert device == torch.device("cuda", expected)
    # init_distributed's export, without the NCCL rendezvous (the group "exists")
    monkeypatch.setattr(ds.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ds.deepspeed, "init_distributed", lambda **kwargs: None)
    ds.init_distributed(env, device)
    assert env.local_rank == 5                      # the project keeps the true local rank

    # DeepSpeedEngine.__init__: _configure_with_arguments, then _set_distributed_vars
    engine = types.SimpleNamespace()
    DeepSpeedEngine._configure_with_arguments(engine, None, None)
    monkeypatch.setattr(ds_engine, "get_accelerator", lambda: CudaLikeAccelerator(calls))
    monkeypatch.setattr(ds_comm, "get_world_size", lambda group=None: 16)
    monkeypatch.setattr(ds_comm, "get_rank", lambda group=None: 13)
    DeepSpeedEngine._set_distributed_vars(engine, None)
    assert engine.device == device
    assert calls == [("torch", expected), ("deepspeed", expected)]
    # zero.Init's local_device, ZeRO's utilities, comm's device_id and dist.get_local_rank
    assert int(os.environ["LOCAL_RANK"]) == expected
    assert get_local_rank_from_launcher() == expected
    # a later detect() reads the ordinal as local rank: the same GPU again
    assert cuda_index(detect().local_rank, visible) == expected


def test_gpu_loader_copies_uint8_and_normalises_on_the_device():
    """FFCV's ImageNet recipe: the batch crosses PCIe as uint8 (4x fewer bytes), asynchronously,
    and is normalised on the GPU -- in torch: FFCV's NormalizeImage on a GPU tensor compiles a
    cupy kernel, and nothing installs cupy, so no op of the GPU pipeline may need it. The torch
    normalisation equals what FFCV's NormalizeImage writes on the CPU (its lookup table: float64
    (v - 255 mean) / (255 std) rounded to float32), to float32 rounding. On the CPU
    normalisation stays in FFCV, before ToTensor (#396)."""
    import inspect

    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage

    from hpc_mim.data.ffcv_io import _image_pipeline
    from hpc_mim.data.views import normalize_uint8
    kinds = lambda ops: [type(op) for op in ops]               # noqa: E731
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    gpu = _image_pipeline("decoder", [], mean, std, torch.device("cuda", 0))
    assert kinds(gpu[1:]) == [ToTensor, ToDevice, ToTorchImage]
    assert gpu[2].non_blocking and gpu[2].device == torch.device("cuda", 0)
    needs_cupy = [type(op).__name__ for op in gpu[1:] if "cupy" in inspect.getsource(inspect.getmodule(op))]
    assert not needs_cupy, needs_cupy
    cpu = _image_pipeline("decoder", [], mean, std, torch.device("cpu"))
    assert kinds(cpu[1:]) == [NormalizeImage, ToTensor, ToTorchImage]

    table = torch.from_numpy(cpu[1].lookup_table)             # (256, 3): value, channel -> float32
    values = torch.arange(256).view(16, 16)
    raw = values.expand(4, 3, 16, 16).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    got = normalize_uint8(raw, mean, std)                     # a uint8 batch as ToTorchImage gives it
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    expected = table.T[:, values].expand(4, 3, 16, 16)
    torch.testing.assert_close(got, expected, rtol=2e-7, atol=5e-7)
    formula = (values.double() - 255 * torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)) / (
        255 * torch.tensor(std, dtype=torch.float64).view(3, 1, 1))
    torch.testing.assert_close(got.double(), formula.expand(4, 3, 16, 16), rtol=2e-7, atol=5e-7)


def test_iterate_normalises_a_uint8_gpu_batch_on_its_device():
    """A GPU loader yields the main image as uint8 (channels-last, as ToTorchImage leaves it);
    ``iterate`` hands the training loop float32 normalised images in the same layout."""
    from hpc_mim.data.ffcv_io import iterate
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    raw = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # (B, 3, H, W), NHWC
    label = torch.arange(4, dtype=torch.int32)

    class GpuLoader:                 # what build_loader(device="cuda") returns, as iterate uses it
        next_epoch, batch_size = 0, 4
        traversal_order = type("Order", (), {"skip": 0})()
        hpc_views, hpc_normalize = ((), mean, std), True

        def __iter__(self):
            yield raw, label

    batch = next(iterate(GpuLoader()))
    image = batch["image"]
    assert image.dtype == torch.float32 and image.is_contiguous(memory_format=torch.channels_last)
    m, s = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (mean, std))
    expected = (raw.double() / 255 - m) / s
    torch.testing.assert_close(image.double(), expected, rtol=1e-6, atol=1e-6)
    assert batch["label"].dtype == torch.long
