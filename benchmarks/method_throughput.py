"""Pre-training step throughput of every registered method, side by side in one process.

Each method is built from the same config layers (default preset ``fmnist_tiny``, the demo's
ViT) and runs forward + backward + AdamW step + its ``on_optimizer_step`` hook on a fixed random
batch; no data loading, no DeepSpeed. Prints img/s and the ratio to MAE, writes JSON.

    python benchmarks/method_throughput.py --preset fmnist_tiny --out runs/bench_methods.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hpc_mim.config import load_config  # noqa: E402
from hpc_mim.methods import REGISTRY, build_method  # noqa: E402


def measure(name: str, preset: str, batch: int, steps: int) -> float:
    cfg = load_config(name, preset)
    torch.manual_seed(0)
    method = build_method(cfg.model, cfg.method)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
    s = method.input_size
    data = {k: torch.randn(batch, 3, s, s) for k in ("image",) + tuple(method.extra_views)}
    for i in range(steps + 1):                   # the first step warms up allocators
        if i == 1:
            start = time.perf_counter()
        loss = method(data)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.on_optimizer_step(i / steps)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fmnist_tiny")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_methods.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rates = {name: measure(name, args.preset, args.batch, args.steps) for name in sorted(REGISTRY)}
    print(f"{'method':12s} {'img/s':>8s} {'x mae':>6s}   (preset {args.preset}, batch {args.batch}, "
          f"{args.threads} threads)")
    for name, rate in rates.items():
        print(f"{name:12s} {rate:8.0f} {rate / rates['mae']:6.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"preset": args.preset, "batch": args.batch,
                                          "threads": args.threads, "img_per_s": rates}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
