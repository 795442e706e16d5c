"""Convert an ImageFolder tree (``<split>/<class>/*.jpg``: ImageNet, CUB, ...) to FFCV.

    python -m data_prep.image_folder --src /datasets/imagenet --out data/imagenet --max-resolution 256

``--src`` must hold ``train/`` and ``val/`` (or name them with ``--splits``), each with one
folder per class; class indices follow the sorted folder names of the first split. Writes
``<out>/<split>.beton`` and a manifest ``<out>/<split>.json``. Then add the dataset to
configs/datasets.yaml so configs can name it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.manifest import run_cli, write_split

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def scan(root: Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label) pairs of ``root/<class>/*`` in sorted order, and the class names."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class folders (expected {root}/<class>/*.jpg)")
    samples = [(p, label) for label, name in enumerate(classes)
               for p in sorted((root / name).glob("*")) if p.suffix.lower() in EXTENSIONS]
    if not samples:
        raise ValueError(f"{root}: no images with extensions {sorted(EXTENSIONS)}")
    return samples, classes


class ImageFolderSamples:
    """Indexable dataset for the FFCV writer: RGB uint8 (H, W, 3), int label."""

    def __init__(self, samples: list[tuple[Path, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")), label


def convert(src: Path, out: Path, splits: list[str], max_resolution: int | None, mode: str,
            num_workers: int) -> dict[str, Path]:

    out.mkdir(parents=True, exist_ok=True)
    classes: list[str] | None = None
    written = {}
    for split in splits:
        samples, classes = scan(src / split, classes)
        path = out / f"{split}.beton"
        write_split(path, ImageFolderSamples(samples), source=str(src / split), classes=classes,
                    labels=[y for _, y in samples], max_resolution=max_resolution, mode=mode,
                    num_workers=num_workers)
        written[split] = path
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--splits", nargs="+", default=["train", "val"])
    ap.add_argument("--max-resolution", type=int, default=None, help="longest side kept (None = as is)")
    ap.add_argument("--mode", choices=["raw", "jpg"], default="jpg")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    return run_cli(lambda: convert(args.src, args.out, args.splits, args.max_resolution, args.mode,
                                   args.workers))


if __name__ == "__main__":
    sys.exit(main())
