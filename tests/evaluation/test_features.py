"""Frozen features extracted by every rank of a job, and the resumable order of the dense tasks."""
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
