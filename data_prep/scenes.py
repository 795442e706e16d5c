"""Compose segmentation / detection scenes from real Fashion-MNIST items and write them in the
real ADE20K layout and the COCO instances format, so the evaluations read them with the same
loaders as the real datasets.

    python -m data_prep.scenes --out data/fmnist_scenes --train 2000 --val 500 --size 64 [--force]

Each scene: a plain or textured background and 2-4 items (train scenes use training items, val
scenes test items), each rescaled to 18-40 px and placed at random; later items occlude earlier
ones. An item's pixels are those brighter than ``--threshold``; its faint anti-aliased rim is
labelled "ignore" in the semantic map. Written:

    <out>/ade20k/images/{training,validation}/scene_00000001.jpg
    <out>/ade20k/annotations/{training,validation}/scene_00000001.png
        uint8, 0 = ignore, 1 = background, 2..11 = Fashion-MNIST class + 2 (ADE20K convention:
        0 is "other", dropped by reduce_zero_label)
    <out>/coco/{train2017,val2017}/000000000001.jpg
    <out>/coco/annotations/instances_{train,val}2017.json
        one instance per visible item: polygon segmentation, bbox [x, y, w, h] and area of its
        visible part, category_id = Fashion-MNIST class + 1, iscrowd 0

An ``<out>/ade20k`` or ``<out>/coco`` that exists is refused (named, exit code 2, nothing
touched) unless ``--force``: with ``--out data`` the latter would be the registry root of the
real COCO, whose ``annotations/instances_*2017.json`` and ``000000000001.jpg``... would be
overwritten. With ``--force`` both are replaced whole (no scenes of a larger earlier run
linger). The scenes are made in a staging folder (``<out>/.scenes.tmp-<host>-<pid>``) and moved
into place at the end, so a failure leaves the old ones as they were.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from data_prep.fashion_mnist import CLASSES, DEFAULT_SOURCE, load_split
from data_prep.manifest import refuse_existing, run_cli
from hpc_mim.tempfiles import remove_stale, replace_whole, temp_name

ADE_SPLITS = {"train": "training", "val": "validation"}
MIN_VISIBLE_PIXELS = 16          # a mostly hidden item is not an instance (COCO drops tiny ones too)


def background(rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
    """(h, w) float in [0, 255] (``size``: a side or (h, w)): a flat grey, or low-frequency
    noise, or stripes."""
    h, w = (size, size) if isinstance(size, int) else size
    kind = rng.integers(3)
    level = rng.uniform(0, 90)
    if kind == 0:
        return np.full((h, w), level)
    if kind == 1:
        coarse = rng.uniform(-40, 40, (h // 8 + 1, w // 8 + 1)).astype(np.float32)
        return np.clip(level + cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255)
    period, angle = rng.uniform(4, 12), rng.uniform(0, np.pi)
    yy, xx = np.mgrid[:h, :w]
    wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    return np.clip(level + 25 * wave, 0, 255)


def compose(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray,
            size: int | tuple[int, int], threshold: int, item_px: tuple[int, int] = (18, 40),
            ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    """One scene: RGB image (h, w, 3) uint8, semantic map (h, w) uint8 in the ADE20K
    convention, and [(class, visible mask (h, w) bool)] per item, front items last.
    ``size``: a side or (h, w); items are rescaled to ``item_px`` pixels a side."""
    h, w = (size, size) if isinstance(size, int) else size
    canvas = background(rng, (h, w))
    semantic = np.ones((h, w), np.uint8)                        # 1 = background
    masks: list[tuple[int, np.ndarray]] = []
    for _ in range(rng.integers(2, 5)):
        i = rng.integers(len(items))
        side = int(rng.integers(item_px[0], min(item_px[1], h, w) + 1))
        item = np.asarray(Image.fromarray(items[i]).resize((side, side), Image.BILINEAR), np.float32)
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        alpha = np.clip(item / threshold, 0, 1)                # opaque inside, soft at the rim
        window = (slice(y, y + side), slice(x, x + side))
        canvas[window] = canvas[window] * (1 - alpha) + item * alpha
        full = np.zeros((h, w), bool)
        full[window] = item >= threshold
        rim = np.zeros((h, w), bool)
        rim[window] = (item > threshold / 4) & ~full[window]
        semantic[rim] = 0
        semantic[full] = labels[i] + 2
        masks = [(c, m & ~full & ~rim) for c, m in masks] + [(int(labels[i]), full)]
    image = np.repeat(np.clip(canvas, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return image, semantic, masks


def polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons [x1, y1, x2, y2, ...] around each part of ``mask``, a quarter pixel inside
    its outer pixels' edges, so that rasterising the polygon gives back those pixels."""
    up = cv2.resize(mask.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # traced at 2x: a contour point j of the doubled grid is at (j + 0.5) / 2 in pixels
    return [((c.reshape(-1, 2) + 0.5) / 2).ravel().round(2).tolist()
            for c in contours if len(c) >= 3]


def instance(ann_id: int, image_id: int, cls: int, mask: np.ndarray) -> dict | None:
    if mask.sum() < MIN_VISIBLE_PIXELS:
        return None
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {"id": ann_id, "image_id": image_id, "category_id": cls + 1, "iscrowd": 0,
            "segmentation": polygons(mask), "area": float(mask.sum()),
            "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]}


def write_split(out: Path, split: str, count: int, items: np.ndarray, labels: np.ndarray,
                size: int | list[tuple[int, int]], threshold: int, seed: int,
                item_px: tuple[int, int] = (18, 40), classes: list[str] = CLASSES) -> dict:
    """Write ``count`` scenes of one split in both formats; returns COCO's dict. ``size``: one
    side, or a list of (h, w) taken in turn (varied shapes, as in the real sets)."""
    ade_images = out / "ade20k" / "images" / ADE_SPLITS[split]
    ade_labels = out / "ade20k" / "annotations" / ADE_SPLITS[split]
    coco_images = out / "coco" / f"{split}2017"
    for folder in (ade_images, ade_labels, coco_images, out / "coco" / "annotations"):
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    coco = {"info": {"description": f"Fashion-MNIST scenes ({split})", "version": "1.0"},
            "licenses": [], "images": [], "annotations": [],
            "categories": [{"id": c + 1, "name": n, "supercategory": "object"}
                           for c, n in enumerate(classes)]}
    shapes = [(size, size)] if isinstance(size, int) else list(size)
    for image_id in range(1, count + 1):
        h, w = shapes[(image_id - 1) % len(shapes)]
        image, semantic, masks = compose(rng, items, labels, (h, w), threshold, item_px)
        Image.fromarray(image).save(ade_images / f"scene_{image_id:08d}.jpg", quality=95)
        Image.fromarray(semantic).save(ade_labels / f"scene_{image_id:08d}.png")
        name = f"{image_id:012d}.jpg"
        Image.fromarray(image).save(coco_images / name, quality=95)
        coco["images"].append({"id": image_id, "file_name": name, "height": h, "width": w})
        for cls, mask in masks:
            ann = instance(len(coco["annotations"]) + 1, image_id, cls, mask)
            if ann is not None:
                coco["annotations"].append(ann)
    path = out / "coco" / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(coco))
    return coco


def generate(source: Path, out: Path, train: int, val: int, size: int = 64, threshold: int = 48,
             seed: int = 0, force: bool = False) -> dict[str, dict]:
    if size < 40:
        raise ValueError(f"--size {size}: scenes must be >= 40 px to hold 18-40 px items")
    targets = [out / "ade20k", out / "coco"]
    refuse_existing(targets, force)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out)                                # a killed run's staging folder
    staging = temp_name(out / "scenes")
    written = {}
    try:
        for split, count in (("train", train), ("val", val)):
            items, labels = load_split(source, split)
            written[split] = write_split(staging, split, count, items, labels, size, threshold, seed)
            n = len(written[split]["annotations"])
            print(f"{split}: {count} scenes, {n} instances -> {out}/ade20k, {out}/coco")
        refuse_existing(targets, force)              # made meanwhile by someone else?
        for target in targets:
            replace_whole(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path(DEFAULT_SOURCE), help="Fashion-MNIST IDX folder")
    ap.add_argument("--out", type=Path, default=Path("data/fmnist_scenes"))
    ap.add_argument("--train", type=int, default=2000, help="training scenes")
    ap.add_argument("--val", type=int, default=500, help="validation scenes")
    ap.add_argument("--size", type=int, default=64, help="canvas side in pixels")
    ap.add_argument("--threshold", type=int, default=48, help="item pixels are brighter than this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace <out>/ade20k and <out>/coco if they exist")
    args = ap.parse_args(argv)
    return run_cli(lambda: generate(args.source, args.out, args.train, args.val, args.size,
                                    args.threshold, args.seed, args.force))


if __name__ == "__main__":
    sys.exit(main())
