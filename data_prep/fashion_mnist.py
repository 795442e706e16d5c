"""Convert Fashion-MNIST (IDX files) to FFCV: ``<out>/train.beton`` and ``<out>/val.beton``.

Reads the four gzipped IDX files shipped by Debian's ``dataset-fashion-mnist`` package
(/usr/share/datasets/fashion-mnist), or from any folder given with ``--source``. Images are
28x28 grayscale, stored as RGB (channel replicated) so every dataset shares one pipeline.

    python -m data_prep.fashion_mnist --out data/fmnist

Refused before anything is written: a negative ``--limit`` (argparse error, exit 2) and a label
file with a label outside [0, 10) (the file and the label named, exit 1): such a label would
surface much later, as an index error inside kNN. A re-conversion replaces the old files only
once the new ones are complete (data_prep/manifest.py).
"""
from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np

from data_prep.manifest import run_cli, write_split

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle boot"]
SPLITS = {"train": "train", "val": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """IDX format: magic (2 zero bytes, dtype 0x08 = uint8, ndim), big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX uint8 file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {tuple(dims)} = {np.prod(dims)} bytes, got {data.size}")
    return data.reshape(dims)


def find_file(source: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (source / name).is_file():
            return source / name
    raise FileNotFoundError(f"{source}: no {stem}[.gz]; install Debian's dataset-fashion-mnist "
                            f"or pass --source with the four IDX files")


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 in [0, len(CLASSES)) of one split."""
    prefix = SPLITS[split]
    images = read_idx(find_file(source, f"{prefix}-images-idx3-ubyte"))       # (N, 28, 28)
    label_file = find_file(source, f"{prefix}-labels-idx1-ubyte")
    labels = read_idx(label_file)                                              # (N,)
    if len(images) != len(labels):
        raise ValueError(f"{source}: {split} has {len(images)} images but {len(labels)} labels")
    outside = np.flatnonzero(labels >= len(CLASSES))     # uint8: never negative
    if outside.size:
        i = int(outside[0])
        raise ValueError(f"{label_file}: label {int(labels[i])} (sample {i}) is outside "
                         f"[0, {len(CLASSES)}); {outside.size} such labels")
    return images, labels


class GrayAsRGB:
    """Indexable dataset for the FFCV writer: (28, 28) uint8 -> (28, 28, 3)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return np.repeat(self.images[i][:, :, None], 3, axis=2), int(self.labels[i])


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0 (argparse names the option in its error, exit code 2)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 0 (0 = all)")
    return value


def convert(source: Path, out: Path, limit: int = 0, mode: str = "raw",
            max_resolution: int | None = None) -> dict[str, Path]:
    """``out/{train,val}.beton`` and their manifests; ``limit``: the first N images of each
    split (0 = all)."""
    if limit < 0:
        raise ValueError(f"--limit {limit}: must be >= 0 (0 = all)")
    # every split read and checked before the first is written: a bad label file must not
    # leave a new train.beton beside the old val.beton
    loaded = {split: load_split(source, split) for split in SPLITS}
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, (images, labels) in loaded.items():
        if limit:
            images, labels = images[:limit], labels[:limit]
        path = out / f"{split}.beton"
        write_split(path, GrayAsRGB(images, labels), source=str(source), classes=CLASSES,
                    labels=labels.tolist(), max_resolution=max_resolution, mode=mode)
        written[split] = path
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path(DEFAULT_SOURCE), help="folder with the IDX files")
    ap.add_argument("--out", type=Path, default=Path("data/fmnist"))
    ap.add_argument("--limit", type=nonnegative_int, default=0, help="first N images per split (0 = all)")
    ap.add_argument("--mode", choices=["raw", "jpg"], default="raw", help="raw is bit-exact")
    ap.add_argument("--max-resolution", type=int, default=None, help="downscale the longest side to this")
    args = ap.parse_args(argv)
    return run_cli(lambda: convert(args.source, args.out, args.limit, args.mode, args.max_resolution))


if __name__ == "__main__":
    sys.exit(main())
