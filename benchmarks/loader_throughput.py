"""Training-loader throughput, side by side: our FFCV loader (.beton, seeded crops), FFCV's
stock RandomResizedCrop + flip decoder, and a torchvision PIL DataLoader.

All read the same Fashion-MNIST training images and produce the same batches (random resized
crop + flip + normalise, float (B, 3, S, S)); no model runs. Prints img/s per epoch and writes
JSON. FFCV's first epoch includes its numba compilation. The stock decoder shows what the
per-sample reseeding of hpc_mim/data/ffcv_io.py's SeededRandomResizedCrop (exact resume) costs.

    python benchmarks/loader_throughput.py --beton data/fmnist/train.beton --images 20000 --out runs/bench_loader.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_prep.fashion_mnist import DEFAULT_SOURCE, load_split  # noqa: E402
from hpc_mim.data.ffcv_io import build_loader, iterate  # noqa: E402

MEAN, STD = [0.286] * 3, [0.353] * 3


class PILImages(Dataset):
    """The same images as PIL RGB, through torchvision transforms (the usual ImageFolder path)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int) -> None:
        self.images, self.labels = images, labels
        self.tf = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0)), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.tf(Image.fromarray(self.images[i]).convert("RGB")), int(self.labels[i])


def timed_epochs(batches, epochs: int) -> list[float]:
    rates = []
    for epoch in range(epochs):
        start, n = time.time(), 0
        for images in batches(epoch):
            n += images.shape[0]
        rates.append(n / (time.time() - start))
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beton", default="data/fmnist/train.beton")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    ffcv = build_loader(args.beton, args.batch_size, args.size, MEAN, STD, train=True,
                        num_workers=args.workers, max_samples=args.images)
    ffcv_rates = timed_epochs(lambda e: (b["image"] for b in iterate(ffcv, e)), args.epochs)
    stock = build_loader(args.beton, args.batch_size, args.size, MEAN, STD, train=True,
                         num_workers=args.workers, max_samples=args.images, crop="stock")
    stock_rates = timed_epochs(lambda e: (b["image"] for b in iterate(stock, e)), args.epochs)

    images, labels = load_split(Path(DEFAULT_SOURCE), "train")
    pil = DataLoader(PILImages(images[:args.images], labels[:args.images], args.size),
                     batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                     drop_last=True, persistent_workers=True)
    pil_rates = timed_epochs(lambda e: (x for x, _ in pil), args.epochs)

    result = {"images": args.images, "batch_size": args.batch_size, "workers": args.workers,
              "ffcv_img_per_s": ffcv_rates, "stock_ffcv_img_per_s": stock_rates, "pil_img_per_s": pil_rates,
              "speedup_after_first_epoch": float(np.mean(ffcv_rates[1:]) / np.mean(pil_rates[1:])),
              "seeded_over_stock": float(np.mean(ffcv_rates[1:]) / np.mean(stock_rates[1:]))}
    for name in ("ffcv", "stock_ffcv", "pil"):
        print(f"{name:>10}: " + "  ".join(f"epoch {i}: {r:,.0f} img/s" for i, r in enumerate(result[f'{name}_img_per_s'])))
    print(f"FFCV / PIL after the first epoch: {result['speedup_after_first_epoch']:.2f}x; "
          f"seeded crops / FFCV's stock decoder: {result['seeded_over_stock']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
