"""Convert an ImageFolder tree (``<split>/<class>/*.jpg``: ImageNet, CUB, ...) to FFCV.

    python -m data_prep.image_folder --src /datasets/imagenet --out data/imagenet --max-resolution 256

``--src`` must hold ``train/`` and ``val/`` (or name them with ``--splits``), each with one
folder per class; class indices follow the sorted folder names of the first split. Writes
``<out>/<split>.beton`` and a manifest ``<out>/<split>.json``. Then add the dataset to
configs/datasets.yaml so configs can name it.

Every file is decoded once before writing (in ``--workers`` processes): broken ones (empty,
corrupt, truncated, too small, decompression bombs) are skipped and listed with the reason in
the manifest and on stdout; CMYK, grayscale, palette, alpha and 16-bit images are converted to
RGB (data_prep/images.py). The exit code is 1 when more than ``--max-bad-fraction`` of a
split was skipped (the files are still written, so one can look), or when writing fails (the
file it failed on is named; FFCV's writer alone would hang). Images are stored at their size
(or ``--max-resolution``): the FFCV page size is chosen to hold the largest one, and the
manifest records it (``page_size``, ``largest_image``).
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import images
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

    def __init__(self, samples: list[tuple[Path, int]], root: Path | None = None) -> None:
        self.samples, self.root = samples, root

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, i: int) -> str:
        """The file behind sample i (named when the writer fails on it)."""
        path = self.samples[i][0]
        return str(path.relative_to(self.root) if self.root else path)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        return images.load_rgb(path), label


class TooManyBadImages(ValueError):
    """More than the allowed fraction of a split could not be converted."""


def screen(samples: list[tuple[Path, int]], root: Path, num_workers: int, min_size: int,
           max_pixels: int) -> tuple[list[tuple[Path, int]], list[dict[str, str]], dict[str, Any]]:
    """(samples that decode, [{"file", "reason"}] of those skipped, the largest good image
    {"file", "width", "height"}), in the original order."""
    inspect = partial(images.inspect, min_size=min_size, max_pixels=max_pixels)
    paths = [p for p, _ in samples]
    if num_workers > 1:
        with Pool(num_workers) as pool:
            results = pool.map(inspect, paths, chunksize=64)
    else:
        results = [inspect(p) for p in paths]
    good = [s for s, (r, _) in zip(samples, results) if r is None]
    skipped = [{"file": str(p.relative_to(root)), "reason": r} for p, (r, _) in zip(paths, results) if r]
    sizes = [(w * h, str(p.relative_to(root)), w, h) for p, (r, (w, h)) in zip(paths, results) if r is None]
    _, file, w, h = max(sizes, default=(0, "", 0, 0))
    return good, skipped, {"file": file, "width": w, "height": h}


def convert(src: Path, out: Path, splits: list[str], max_resolution: int | None, mode: str,
            num_workers: int, min_size: int = images.MIN_SIZE, max_pixels: int = images.MAX_PIXELS,
            max_bad_fraction: float = 0.01) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    classes: list[str] | None = None
    written, too_bad = {}, []
    for split in splits:
        samples, classes = scan(src / split, classes)
        good, skipped, largest = screen(samples, src / split, num_workers, min_size, max_pixels)
        for s in skipped:
            print(f"[data_prep] skipped {split}/{s['file']}: {s['reason']}", flush=True)
        fraction = len(skipped) / len(samples)
        print(f"[data_prep] {split}: {len(good)} of {len(samples)} images converted, "
              f"{len(skipped)} skipped ({100 * fraction:.2f}%)", flush=True)
        if not good:
            raise TooManyBadImages(f"{src / split}: none of {len(samples)} images could be read")
        path = out / f"{split}.beton"
        write_split(path, ImageFolderSamples(good, src / split), source=str(src / split),
                    classes=classes, labels=[y for _, y in good], max_resolution=max_resolution,
                    mode=mode, num_workers=num_workers, largest=largest,
                    extra={"num_files": len(samples), "num_skipped": len(skipped),
                           "skipped_fraction": round(fraction, 6), "skipped": skipped})
        written[split] = path
        if fraction > max_bad_fraction:
            too_bad.append(f"{split}: {len(skipped)} of {len(samples)} ({100 * fraction:.1f}%)")
    if too_bad:
        raise TooManyBadImages(f"more than {100 * max_bad_fraction:g}% of the images could not be "
                               f"converted ({'; '.join(too_bad)}); see 'skipped' in the manifests "
                               f"in {out} (--max-bad-fraction raises the limit)")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--splits", nargs="+", default=["train", "val"])
    ap.add_argument("--max-resolution", type=int, default=None, help="longest side kept (None = as is)")
    ap.add_argument("--mode", choices=["raw", "jpg"], default="jpg")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--min-size", type=int, default=images.MIN_SIZE,
                    help="skip images with a side shorter than this (px)")
    ap.add_argument("--max-pixels", type=int, default=images.MAX_PIXELS,
                    help="skip images with more pixels than this (decompression bombs)")
    ap.add_argument("--max-bad-fraction", type=float, default=0.01,
                    help="exit 1 when more than this fraction of a split is skipped")
    args = ap.parse_args(argv)
    return run_cli(lambda: convert(args.src, args.out, args.splits, args.max_resolution, args.mode,
                                   args.workers, args.min_size, args.max_pixels,
                                   args.max_bad_fraction))


if __name__ == "__main__":
    sys.exit(main())
