"""``make gpu-check`` on one GPU node: NCCL, every method's bf16 steps with an exact resume, the
trainable evaluations at their real resolutions. (The MAE ViT-B/16 throughput and MFU are
benchmarks/gpu_throughput.py, which the script runs after these.)

Sizes: ViT-S/16 at 224 (LatentMIM: its gapped 280 px crops), batch 64, 50 steps, a checkpoint
at step 40; the resumed run must reproduce steps 41-50 exactly: the same mean loss at step 50
and bit-identical weights. That needs the CUDA generator in the checkpoint (masks and noise are
drawn on the GPU) and deterministic kernels: this module turns torch's deterministic mode on
and runs attention through the math kernel while it compares.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.attention import SDPBackend, sdpa_kernel

from hpc_mim.distributed.env import DistEnv, free_port
from hpc_mim.methods import REGISTRY

REPO = Path(__file__).resolve().parents[2]
# HPC_MIM_GPU_TESTS_ON_CPU=1 runs this module on a CPU at tiny sizes: a dry run of the test code
# itself, not a GPU check. Without it and without CUDA, every test is skipped with the reason.
DRY_RUN = os.environ.get("HPC_MIM_GPU_TESTS_ON_CPU") == "1"
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or DRY_RUN),
                                reason="no CUDA device: tests/gpu run on a GPU node (make gpu-check)")

STEPS, RESUME_AT, LOG_EVERY = (6, 4, 2) if DRY_RUN else (50, 40, 10)


@pytest.fixture(scope="session")
def device() -> torch.device:
    from hpc_mim.distributed.env import training_device
    return training_device(DistEnv())


@pytest.fixture(scope="session")
def gpu_data(tmp_path_factory) -> Path:
    """data.root with imagenet/{train,val}.beton (JPEGs of varied sizes, jpg mode),
    ADEChallengeData2016/ and coco/ in their real layouts."""
    root = tmp_path_factory.mktemp("gpu_data")
    per_class = "8" if DRY_RUN else "200"
    for cmd in (["-m", "data_prep.synthetic", "--out", str(root), "--classes", "4", "--train",
                 per_class, "--val", "8", "--scenes", "8"],
                ["-m", "data_prep.image_folder", "--src", str(root / "imagenet_tree"), "--out",
                 str(root / "imagenet"), "--mode", "jpg", "--workers", str(min(8, os.cpu_count() or 1))]):
        subprocess.run([sys.executable, *cmd], cwd=REPO, check=True, capture_output=True)
    return root


def make_run(tmp_path: Path, method: str, overrides: list[str]):
    """A run directory as jobs/submit.py leaves it (config, MLflow parent run, tracking.json),
    from the method's paper YAML with ``overrides``."""
    from hpc_mim import tracking
    from hpc_mim.config import load_config, save_config
    from hpc_mim.rundir import RunDir
    cfg = load_config(method, overrides=overrides)
    run = RunDir(tmp_path / method).create()
    save_config(cfg, run.config)
    uri = tracking.default_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "gpu-check")
    parent = tracking.MLflowLogger.create_run(uri, exp, f"gpu-check-{method}")
    run.write_tracking({"uri": uri, "experiment_id": exp, "run_id": parent.run_id})
    return run, cfg


def overrides(data_root, method: str) -> list[str]:
    if DRY_RUN:          # tiny, to run the test code itself on a CPU
        size = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=2",
                "model.num_heads=2", "method.decoder_dim=64", "method.decoder_depth=1",
                "method.decoder_heads=2", "method.noised_mim.noise_block=1",
                "method.latent_mim.head_hidden_dim=64", "method.lut.head_hidden_dim=64",
                "train.batch_size=8", "train.micro_batch_size=8", "data.num_workers=1"]
    else:                # ViT-S/16 at 224
        size = ["model.img_size=224", "model.patch_size=16", "model.embed_dim=384", "model.depth=12",
                "model.num_heads=6", "train.batch_size=64", "train.micro_batch_size=64",
                "data.num_workers=8"]
    return size + [f"data.root={data_root}", "train.precision=bf16", "train.zero_stage=2",
                   "train.epochs=100", "train.warmup_epochs=1", f"train.max_steps={STEPS}",
                   f"train.log_every={LOG_EVERY}", f"checkpoint.every_steps={RESUME_AT}",
                   "checkpoint.keep_last=50"]


def all_reduce_worker(rank: int, port: int) -> None:
    from hpc_mim.distributed import deepspeed as ds
    from hpc_mim.distributed.env import training_device
    env = DistEnv(rank=rank, world_size=2, local_rank=rank, local_world_size=2, master_port=port)
    device = training_device(env)
    ds.init_distributed(env, device)
    t = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(t)
    assert t.device == device and torch.equal(t.cpu(), torch.full((4,), 3.0))
    dist.destroy_process_group()


def test_nccl_world_of_one_and_of_two_gpus(device):
    """The backend is NCCL on a GPU; two ranks when two GPUs are visible (each its own)."""
    from hpc_mim.distributed import deepspeed as ds
    ds.init_distributed(DistEnv(master_port=free_port()), device)
    assert dist.get_backend() == ("nccl" if device.type == "cuda" else "gloo")
    t = torch.ones(3, device=device)
    dist.all_reduce(t)
    assert torch.equal(t.cpu(), torch.ones(3))
    if torch.cuda.device_count() >= 2:
        port = free_port()
        mp.spawn(all_reduce_worker, args=(port,), nprocs=2, join=True)


DEVICE_BINDING_RUN = r"""
import json, os
import torch
from hpc_mim.config import TrainConfig
from hpc_mim.distributed import deepspeed as ds
from hpc_mim.train.process import join
proc = join()                                  # detect(): RANK, LOCAL_RANK, ... from the environment
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
model.to(proc.device)
engine = ds.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                       TrainConfig(batch_size=4, micro_batch_size=4, zero_stage=2), world_size=1)
loss = engine(torch.randn(4, 64, device=proc.device)).square().mean()
engine.backward(loss)                          # ZeRO-2's buckets live on DeepSpeed's device
engine.step()
print("REPORT " + json.dumps({"project": str(proc.device), "engine": str(engine.device),
                              "current": torch.cuda.current_device(), "local_rank": proc.env.local_rank,
                              "LOCAL_RANK": os.environ["LOCAL_RANK"],
                              "params": sorted({str(p.device) for p in engine.module.parameters()})}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("binding", ["one GPU per task", "all GPUs visible"])
def test_deepspeed_engine_drives_the_gpu_the_project_chose(binding):
    """A task of local rank > 0 whose SLURM binding shows it one GPU (index 0 for it) builds a
    ZeRO-2 engine and steps on that GPU; DeepSpeed reads LOCAL_RANK as the device ordinal, and
    an exported local rank of 3 was "invalid device ordinal". With all GPUs visible the task
    drives the one of its local rank."""
    import json
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if binding == "one GPU per task":
        local_rank, env_visible, expected = 3, ids[0], 0
    else:
        if len(ids) < 2:
            pytest.skip("one GPU: every local rank > 0 needs a GPU of its own")
        local_rank, env_visible, expected = len(ids) - 1, ",".join(ids), len(ids) - 1
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": env_visible, "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(max(len(ids), local_rank + 1)),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    r = subprocess.run([sys.executable, "-c", DEVICE_BINDING_RUN], capture_output=True, text=True,
                       env=env, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.split("REPORT ", 1)[1])
    device = f"cuda:{expected}"
    assert report["project"] == report["engine"] == device and report["current"] == expected
    assert report["params"] == [device]
    assert report["local_rank"] == local_rank and report["LOCAL_RANK"] == str(expected)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_bf16_steps_checkpoint_and_exact_resume(method, gpu_data, tmp_path, device):
    from hpc_mim.models.vit import load_encoder
    from hpc_mim.train.trainer import Trainer
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            run_a, cfg = make_run(tmp_path / "a", method, overrides(gpu_data, method))
            full = Trainer(cfg, run_a, env=DistEnv(master_port=free_port())).fit()
            run_b, _ = make_run(tmp_path / "b", method, overrides(gpu_data, method))
            tag = f"step_{RESUME_AT:08d}"                   # only the step-40 checkpoint
            shutil.copytree(run_a.checkpoints / tag, run_b.checkpoints / tag)
            (run_b.checkpoints / "latest").write_text(tag)
            resumed = Trainer(cfg, run_b, env=DistEnv(master_port=free_port())).fit()
    finally:
        torch.use_deterministic_algorithms(False)
    assert math.isfinite(full["train/loss"])
    assert "resumed from step_" in run_b.pretrain_log.read_text()
    # the mean loss of steps 41-50 and the final weights of the two runs
    assert resumed["train/loss"] == full["train/loss"], (resumed["train/loss"], full["train/loss"])
    a, b = load_encoder(run_a.encoder).state_dict(), load_encoder(run_b.encoder).state_dict()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def mae_run(gpu_data, tmp_path_factory, device):
    """A MAE ViT-S/16 pre-trained for a few steps and exported: what the evaluations read."""
    from hpc_mim.train.trainer import Trainer
    run, cfg = make_run(tmp_path_factory.mktemp("mae_eval"), "mae", overrides(gpu_data, "mae"))
    Trainer(cfg, run, env=DistEnv(master_port=free_port())).fit()
    return run


def test_finetuning_20_bf16_steps(mae_run):
    from evaluation import finetune
    batch = 8 if DRY_RUN else 64
    out = finetune.main(str(mae_run.root), overrides=[
        "eval.finetune.max_steps=20", f"eval.finetune.batch_size={batch}",
        f"eval.finetune.micro_batch_size={batch}", "eval.finetune.precision=bf16"])
    assert 0 <= out["pretrained"]["top1"] <= 100 and math.isfinite(out["pretrained"]["train_loss"])


def test_segmentation_10_steps_at_512_with_sliding_windows(mae_run):
    from evaluation import segmentation
    size = ["eval.segmentation.scale=64", "eval.segmentation.crop_size=32",
            "eval.segmentation.stride=16", "eval.segmentation.channels=16"] if DRY_RUN else []
    out = segmentation.main(str(mae_run.root), overrides=size + [
        "eval.segmentation.steps=10", "eval.segmentation.warmup_steps=2",
        "eval.segmentation.batch_size=4", "eval.segmentation.max_val_samples=2"])
    assert 0 <= out["pretrained"]["miou"] <= 100 and math.isfinite(out["pretrained"]["train_loss"])


def test_detection_10_steps_at_1024(mae_run):
    from evaluation import detection
    size = ["eval.detection.image_size=64", "eval.detection.fpn_channels=16",
            "eval.detection.box_head_dim=32", "eval.detection.anchor_sizes=[8, 16, 32, 48, 64]",
            "eval.detection.rois_per_image=32"] if DRY_RUN else []
    out = detection.main(str(mae_run.root), overrides=size + [
        "eval.detection.steps=10", "eval.detection.warmup_steps=2",
        "eval.detection.batch_size=2", "eval.detection.max_val_samples=2"])
    assert 0 <= out["pretrained"]["box_ap"] <= 100 and math.isfinite(out["pretrained"]["train_loss"])


def test_gpu_loader_normalises_in_torch_without_cupy(device, tmp_path, monkeypatch):
    """A real loader on the device: FFCV's NormalizeImage on a GPU tensor would import cupy
    (which nothing installs), so the uint8 batch is normalised in torch by ``iterate``: float32,
    channels-last, on the device, equal to the CPU loader's FFCV-normalised batch to float32
    rounding. Then fine-tuning's batched RandAugment on it, under CUDA's sync debug mode: no
    host sync."""
    import numpy as np

    from hpc_mim.data.ffcv_io import build_loader, iterate, write_beton
    from hpc_mim.data.views import normalize_uint8, rand_augment
    monkeypatch.setitem(sys.modules, "cupy", None)              # ``import cupy`` now fails
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), i % 4) for i in range(16)]
    path = str(tmp_path / "tiny.beton")
    write_beton(path, samples, mode="raw", num_workers=1)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    kw = dict(batch_size=8, img_size=32, mean=mean, std=std, train=False, num_workers=1)
    on_device = [b["image"].clone() for b in iterate(build_loader(path, device=device, **kw))]
    on_cpu = [b["image"].clone() for b in iterate(build_loader(path, device="cpu", **kw))]
    image, reference = on_device[0], on_cpu[0]              # FFCV's NormalizeImage on the CPU
    assert len(on_device) == len(on_cpu) == 2
    assert image.device == device and image.dtype == torch.float32
    assert image.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(image.cpu(), reference, rtol=2e-7, atol=5e-7)
    if device.type != "cuda":
        return
    raw = ((image * torch.tensor(std, device=device).view(1, 3, 1, 1)
            + torch.tensor(mean, device=device).view(1, 3, 1, 1)) * 255).round().to(torch.uint8)
    for policy in ("rand-m9-mstd0.5-inc1", "tv-rand-n2-m9"):
        rand_augment(image, mean, std, policy)                   # first call: tables copied once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = rand_augment(image, mean, std, "rand-m9-mstd0.5-inc1")   # MAE's (timm's policy)
        out_tv = rand_augment(image, mean, std, "tv-rand-n2-m9")
        again = normalize_uint8(raw.contiguous(memory_format=torch.channels_last), mean, std)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.dtype == torch.float32 and out.device == device and torch.isfinite(out).all()
    assert torch.isfinite(out_tv).all()
    torch.testing.assert_close(again, image, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares CUDA kernels")
def test_batched_timm_rand_augment_ops_match_the_cpu_on_the_gpu(device):
    """On a CPU every op of hpc_mim/data/randaugment_timm.py equals timm's PIL op to the bit
    (tests/test_randaugment_timm.py); on the GPU the same float operations run as separate
    kernels, so they should agree too: at most 0.1% of an op's values may differ (a libm
    cos / sin or a float64 bicubic value on the other side of an integer)."""
    from hpc_mim.data.randaugment_timm import INCREASING, apply_timm_ops, fill_for
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 48, 64), dtype=torch.uint8, generator=g)
    x[0] = torch.randint(100, 121, (3, 48, 64), dtype=torch.uint8, generator=g)   # low contrast
    mags = torch.rand(16, dtype=torch.float64, generator=g) * 10
    negate = torch.rand(16, generator=g) > 0.5
    mean = (0.485, 0.456, 0.406)
    for k, name in enumerate(INCREASING):
        choice = torch.full((16,), k)
        want = apply_timm_ops(x, choice, mags, negate, INCREASING, fill_for(mean, torch.device("cpu")))
        got = apply_timm_ops(x.to(device), choice.to(device), mags.to(device), negate.to(device),
                             INCREASING, fill_for(mean, device))
        wrong = int((got.cpu() != want).sum())
        assert wrong <= 1e-3 * x.numel(), (name, wrong)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares CUDA kernels")
def test_batched_rand_augment_ops_match_torchvision_per_image_on_the_gpu(device):
    """On a CPU every batched op equals torchvision's per image to the bit (tests/test_views.py).
    On a GPU the kernels differ (cuBLAS for the affine grid's bmm, nvcc's fused multiply-adds in
    torchvision's blends): allowed here, at most 0.1% of the values of an op's output differ
    (a nearest-neighbour tie decided the other way, a blend truncated on the other side of an
    integer); the assertion message gives the count."""
    from torchvision.transforms.v2 import RandAugment

    from hpc_mim.data.randaugment import TORCHVISION, apply_ops
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=g)
    x[0] = torch.randint(100, 121, (3, 64, 64), dtype=torch.uint8, generator=g)   # low contrast
    x[1] = (torch.arange(64).view(64, 1) * 2 + torch.arange(64)).clamp(max=255).to(torch.uint8)
    x = x.to(device)
    augment = RandAugment()
    for k, (name, op) in enumerate(TORCHVISION.items()):
        table = RandAugment._AUGMENTATION_SPACE[name][0](31, 64, 64)
        for negative in ((False, True) if op.signed else (False,)):
            got = apply_ops(x, torch.full((16,), k, device=device),
                            torch.full((16,), 9.0, dtype=torch.float64, device=device),
                            torch.full((16,), negative, device=device), TORCHVISION)
            value = 0.0 if table is None else float(table[9]) * (-1 if negative else 1)
            expected = torch.stack([augment._apply_image_or_video_transform(
                img, name, value, interpolation=augment.interpolation, fill=augment._fill) for img in x])
            wrong = int((got != expected).sum())
            assert wrong <= 1e-3 * x.numel(), (name, negative, wrong)
