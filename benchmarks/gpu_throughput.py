"""MAE ViT-B/16 pre-training throughput on one GPU: img/s, peak GPU memory and model FLOPs
utilisation (hpc_mim/models/flops.py: matmul FLOPs counted analytically, against the card's
peak dense bf16 rate). The step is the pipeline's own: the method through a DeepSpeed engine
(ZeRO-2, ``precision: bf16`` = autocast with fp32 weights), torch AdamW, on synthetic
device-resident batches, so the figure is the model step without the loader.

    python benchmarks/gpu_throughput.py [--batch 64] [--steps 30] [--peak-tflops 989] [--out FILE]

989 TFLOP/s is the H100/H200 SXM dense bf16 peak of NVIDIA's datasheets.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpc_mim.config import load_config  # noqa: E402
from hpc_mim.distributed import deepspeed as ds  # noqa: E402
from hpc_mim.distributed.env import DistEnv, free_port, training_device  # noqa: E402
from hpc_mim.methods import build_method  # noqa: E402
from hpc_mim.models.flops import mae_flops  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="per-GPU batch (MAE's 4096 / 64 GPUs)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps, after 10 warm-up steps")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_throughput.json")
    args = ap.parse_args()

    env = DistEnv(master_port=free_port())
    device = training_device(env)
    ds.init_distributed(env, device)
    cfg = load_config("mae", overrides=[f"train.batch_size={args.batch}",
                                        f"train.micro_batch_size={args.batch}"])
    method = build_method(cfg.model, cfg.method).to(device)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    engine = ds.initialize(method, opt, cfg.train, world_size=1)
    batch = {"image": torch.randn(args.batch, 3, 224, 224, device=device)}

    def step() -> None:
        engine.backward(engine(batch)["loss"])
        engine.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(10):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    img_s = args.steps * args.batch / seconds
    flops = mae_flops(cfg.model, cfg.method)["train"]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": "MAE ViT-B/16 224, mask 0.75, decoder 512x8", "precision": cfg.train.precision,
        "batch": args.batch, "steps": args.steps, "img_per_s": round(img_s, 1),
        "ms_per_step": round(1000 * seconds / args.steps, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
        if device.type == "cuda" else None,
        "gflops_per_image": round(flops / 1e9, 2),
        "achieved_tflops": round(flops * img_s / 1e12, 1),
        "mfu": round(flops * img_s / (args.peak_tflops * 1e12), 4), "peak_tflops": args.peak_tflops}
    for key, value in report.items():
        print(f"{key:>18}: {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
