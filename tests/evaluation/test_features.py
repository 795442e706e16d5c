"""Frozen features extracted by every rank of a job, and the resumable order of the dense tasks."""
import time

import torch
import torch.multiprocessing as mp

from hpc_mim.distributed.env import free_port

SOURCE = "/usr/share/datasets/fashion-mnist"


def sharded_worker(rank: int, port: int, beton: str, out: dict) -> None:
    from evaluation.features import extract_features, gather_shards
    from hpc_mim.config import load_config
    from hpc_mim.distributed.env import DistEnv
    from hpc_mim.train.process import join
    proc = join(env=DistEnv(rank=rank, world_size=2, master_port=port))
    rows = torch.arange(21.).view(7, 3)
    out[f"gather{rank}"] = gather_shards(rows[rank::2], 2)
    cfg = load_config("mae", "smoke")
    info = {"mean": [0.3] * 3, "std": [0.3] * 3}
    torch.manual_seed(0)
    from hpc_mim.models.vit import ViTEncoder
    enc = ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    feats = extract_features({"": enc, "pixels": None}, beton, cfg, info, "mean", 101,
                             proc.device, rank, 2)
    out[f"feats{rank}"] = {k: (f.clone(), y.clone()) for k, (f, y) in feats.items()}


def test_every_rank_extracts_its_shard_and_all_get_the_single_process_features(data_root):
    from evaluation.features import extract_features
    from hpc_mim.config import load_config
    from hpc_mim.models.vit import ViTEncoder
    beton = str(data_root / "fmnist" / "val.beton")
    out = mp.Manager().dict()
    mp.spawn(sharded_worker, args=(free_port(), beton, out), nprocs=2, join=True)
    rows = torch.arange(21.).view(7, 3)
    assert torch.equal(out["gather0"], rows) and torch.equal(out["gather1"], rows)

    torch.manual_seed(0)
    enc = ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    single = extract_features({"": enc, "pixels": None}, beton, load_config("mae", "smoke"),
                              {"mean": [0.3] * 3, "std": [0.3] * 3}, "mean", 101, torch.device("cpu"))
    for rank in (0, 1):
        for name in ("", "pixels"):
            f, y = out[f"feats{rank}"][name]
            assert f.shape[0] == y.shape[0] == 101            # an odd count: shards of 51 and 50
            assert torch.equal(y, single[name][1])
            assert torch.allclose(f, single[name][0], atol=1e-5)


COLLECTIVE_S = 20            # a diverged collective fails after this, rather than hang the suite


def cache_race_worker(rank: int, port: int, root: str, beton: str, out: dict) -> None:
    """Two ranks of one kNN job, three calls of ``cached_features`` on the val split: with an
    empty cache (written), with the file appearing between rank 0's and rank 1's looks (the
    linear-probe job wrote it meanwhile), and with a file rank 1's node cannot see yet."""
    from pathlib import Path

    import torch.distributed as dist

    from evaluation import features
    from evaluation.common import EvalContext
    from hpc_mim.config import load_config
    from hpc_mim.distributed.env import DistEnv
    from hpc_mim.rundir import RunDir
    from hpc_mim.train.process import join
    proc = join(rendezvous_timeout_s=30, collective_timeout_s=COLLECTIVE_S,
                env=DistEnv(rank=rank, world_size=2, master_port=port))
    run = RunDir(root)
    info = {"name": "fmnist", "val": beton, "mean": [0.3] * 3, "std": [0.3] * 3}
    ctx = EvalContext(run, load_config("mae", "smoke"), None, info, "knn", proc, ["pixels"], {}, {})
    call = lambda: features.cached_features(ctx, ["pixels"], "val", "mean", 0)["pixels"]  # noqa: E731
    cache = run.evals / "features"

    first = call()                                         # nothing cached: extracted, written
    dist.barrier()
    (written,) = cache.glob("*.pt")
    dist.barrier()                                         # both have looked before it moves
    stash = Path(root) / "other_job.pt"
    if rank == 0:                                          # the other job's file, for later
        written.rename(stash)
    dist.barrier()

    real_is_file = Path.is_file
    if rank == 0:      # rank 0 looked before the other job's file appeared ...
        Path.is_file = lambda p: False if p.parent == cache else real_is_file(p)
    else:              # ... rank 1 after: it is there, whole (renamed into place)
        stash.rename(written)
    out[(rank, "appeared")] = call()
    Path.is_file = real_is_file
    dist.barrier()

    # the file is there for rank 0, while rank 1's node still answers "no such file"
    real_load = features.torch.load
    if rank == 1:
        features.VISIBLE_WAIT_S = 0.5
        Path.is_file = lambda p: False if p.parent == cache else real_is_file(p)
        def invisible(path, *args, **kwargs):
            if Path(path).parent == cache:
                raise FileNotFoundError(path)
            return real_load(path, *args, **kwargs)
        features.torch.load = invisible
    stamp = written.stat().st_mtime_ns
    out[(rank, "invisible")] = call()
    out[(rank, "rewritten")] = written.stat().st_mtime_ns != stamp
    features.torch.load, Path.is_file = real_load, real_is_file
    out[(rank, "first")] = first
    dist.destroy_process_group()


def test_every_rank_takes_rank_0s_view_of_the_feature_cache(data_root, tmp_path):
    """The kNN and linear-probe jobs share the feature cache and may run at once. Decided per
    rank, the file that appears between two ranks' looks has one rank extract (all-gathers)
    while the other loads: the all-gathers never match (an error or a hang). Rank 0 decides
    for all; a rank that cannot read a file rank 0 saw has every rank extract it together."""
    beton = str(data_root / "fmnist" / "val.beton")
    out = mp.Manager().dict()
    ctx = mp.spawn(cache_race_worker, args=(free_port(), str(tmp_path), beton, out), nprocs=2,
                   join=False)
    deadline = time.monotonic() + 8 * COLLECTIVE_S
    while not ctx.join(timeout=1):                         # raises if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("the ranks hang: their collectives diverged")
    f, y = out[(0, "first")]
    assert f.shape == (512, 28 * 28 * 3) and y.shape == (512,)
    for rank in (0, 1):
        for case in ("first", "appeared", "invisible"):
            assert torch.equal(out[(rank, case)][0], f) and torch.equal(out[(rank, case)][1], y)
        assert not out[(rank, "rewritten")]                # rank 0 had read it: left alone


def test_dense_batches_are_a_function_of_seed_epoch_and_sample(tmp_path):
    from pathlib import Path

    from data_prep.scenes import generate
    from hpc_mim.data.dense import ADE20K, SeededSamples, segmentation_transform, shard_batches
    generate(Path(SOURCE), tmp_path, train=10, val=2)
    ds = SeededSamples(ADE20K(tmp_path / "ade20k", "train",
                              segmentation_transform(True, 64, 32, [0.5] * 3, [0.5] * 3)), seed=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = ds[(0, 4)], ds[(0, 4)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])       # same crop and flip again
    assert torch.equal(torch.get_rng_state(), before)                 # the caller's stream untouched
    assert not torch.equal(ds[(1, 4)][0], a[0])                       # another epoch, another crop
    ranks = [shard_batches(10, 2, r, 2, seed=3, epoch=1) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2                        # 10 // (2 x 2); rest dropped
    keys = [k for r in ranks for batch in r for k in batch]
    assert len(set(keys)) == 8 and all(e == 1 for e, _ in keys)
    assert shard_batches(10, 2, 0, 2, seed=3, epoch=1) == ranks[0]
    assert shard_batches(10, 2, 0, 2, seed=3, epoch=2) != ranks[0]
