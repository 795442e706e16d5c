"""How the linear probe's optimizer settings train its BN + linear head on frozen features.

Features: raw pixels of Fashion-MNIST (Debian's dataset-fashion-mnist; the first 20,000, 5,000 or
512 training images, the 10,000 test images), or with ``--dim D`` a fixed random projection of
them to D dimensions through tanh (a stand-in for a tiny encoder's features: the smoke preset's
are 32-d). Optimizers: timm's Lars at weight decay 0 (= SGD with momentum, the probe before
issue 28) vs MAE's LARS (evaluation/lars.py), at the batch sizes and lrs of the presets.

It sized the presets' probes (configs/presets/fmnist_tiny.yaml, smoke.yaml): LARS moves a weight
by lr x 0.001 x ||w|| per step while the biases take plain SGD at the same lr, so a head that
starts at std 0.01 needs MAE's lr (6.4) and hundreds of steps before its weights, not its
biases, decide the class; the linear scaling rule's lr (0.1 x batch / 256) leaves it near chance.

    python benchmarks/probe_sizing.py [--dim 32] [--json runs/probe_sizing.json]   # ~20 s, one thread
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from timm.optim import Lars
from timm.scheduler import CosineLRScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from evaluation.lars import LARS  # noqa: E402
from evaluation.linear_probe import linear_head  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")
# (optimizer, batch, blr, epochs, warmup epochs, training images): the presets old and new
SETTINGS = [("timm", 1024, 0.1, 30, 3, 20000), ("mae", 1024, 0.1, 30, 3, 20000),
            ("mae", 256, 6.4, 30, 3, 20000), ("mae", 256, 0.1, 30, 3, 20000),
            ("timm", 16384, 0.1, 20, 2, 5000), ("mae", 16384, 0.1, 20, 2, 5000),
            ("mae", 256, 6.4, 20, 2, 5000),
            ("timm", 128, 0.1, 5, 1, 512), ("mae", 128, 12.8, 5, 1, 512),
            ("mae", 32, 51.2, 20, 2, 512)]


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 784) in [0, 1] and labels (N,) of the idx files."""
    x = np.frombuffer(gzip.open(DATA / f"{split}-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    y = np.frombuffer(gzip.open(DATA / f"{split}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return torch.tensor(x.reshape(-1, 784), dtype=torch.float32) / 255, torch.tensor(y, dtype=torch.long)


def train_probe(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                optimizer: str, batch: int, blr: float, epochs: int, warmup: int, n: int) -> dict:
    """The probe's head trained as evaluation/linear_probe.py trains it (lr = blr x batch / 256,
    warmup then cosine per step, a fresh permutation per epoch); top-1 (%) on ``test``."""
    torch.manual_seed(0)
    f, y = train[0][:n], train[1][:n]
    batch = min(batch, n)
    head = linear_head(f.shape[1], 10)
    lr = blr * batch / 256
    opt = (LARS if optimizer == "mae" else Lars)(head.parameters(), lr=lr, weight_decay=0.0, momentum=0.9)
    per_epoch = n // batch
    total = per_epoch * epochs
    sched = CosineLRScheduler(opt, t_initial=max(1, total - warmup * per_epoch), warmup_t=warmup * per_epoch,
                              warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    step, start = 0, time.time()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            loss = torch.nn.functional.cross_entropy(head.train()(f[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
    with torch.no_grad():
        top1 = (head.eval()(test[0]).argmax(1) == test[1]).float().mean().item() * 100
    return {"optimizer": optimizer, "train_images": n, "batch": batch, "blr": blr, "lr": lr,
            "epochs": epochs, "steps": total, "top1": round(top1, 1), "seconds": round(time.time() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=0, help="project the pixels to this many features")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, test = load("train"), load("t10k")
    if args.dim:
        proj = torch.randn(784, args.dim, generator=torch.Generator().manual_seed(0))
        train, test = (torch.tanh(train[0] @ proj / 10), train[1]), (torch.tanh(test[0] @ proj / 10), test[1])
    rows = []
    for setting in SETTINGS:
        row = train_probe(train, test, *setting)
        rows.append(row)
        print(f"{row['optimizer']:4s} n={row['train_images']:5d} batch={row['batch']:5d} blr={row['blr']:5} "
              f"lr={row['lr']:5.2f} steps={row['steps']:5d}: top-1 {row['top1']:5.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"dim": args.dim or 784, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
