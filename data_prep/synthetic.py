"""Synthetic datasets at real image sizes in the real layouts, for checks of shapes, decoding and
memory at the papers' scale (``make check-paper-scale``, ``make gpu-check``) on machines that
have none of the datasets (a GPU node without network, this project's CI). Not for accuracy.

    python -m data_prep.synthetic --out data/synthetic --classes 4 --train 40 --val 10 --scenes 8 [--force]

Objects are drawn glyphs: 10 classes of shapes (disc, ring, square, frame, triangle, cross,
bars, stripes, diagonal, checker) rendered with OpenCV, so nothing is downloaded. Written:

    <out>/imagenet_tree/{train,val}/<class>/*.jpg   ImageNet layout, JPEGs of varied sizes
                                                    (500x375, 375x500, 1024x768, ...)
    <out>/ADEChallengeData2016/...                  ADE20K layout (data_prep/scenes.py)
    <out>/coco/...                                  COCO instances format (data_prep/scenes.py)

Convert the tree with ``python -m data_prep.image_folder --src <out>/imagenet_tree --out
<out>/imagenet --mode jpg``; the scenes are read as they are.

``<out>`` is often ``data.root``, where ``ADEChallengeData2016/`` and ``coco/`` are the registry
roots of the real datasets: a target that exists is refused (each named, exit code 2, nothing
touched) unless ``--force``, which replaces it (a symbolic link is replaced, never followed
into what it points at). Everything is made in a private staging folder
(``<out>/.synthetic.tmp-<host>-<pid>``) and moved into place at the end, so a failure or a kill
leaves the old targets as they were.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from data_prep import scenes
from data_prep.manifest import refuse_existing, run_cli
from hpc_mim.tempfiles import remove_stale, replace_whole, temp_name

GLYPHS = ("disc", "ring", "square", "frame", "triangle", "cross", "bars", "stripes",
          "diagonal", "checker")
# (width, height) of the classification images: ImageNet's typical shapes and a large one
SIZES = [(500, 375), (375, 500), (1024, 768), (640, 480), (333, 500)]
SCENE_SHAPES = [(512, 683), (480, 640), (683, 512)]      # (h, w), ADE20K / COCO-like


def glyph(cls: int, rng: np.random.Generator, side: int = 28) -> np.ndarray:
    """One (side, side) uint8 drawing of class ``cls``: bright strokes on black."""
    img = np.zeros((side, side), np.uint8)
    c, r = side // 2, side // 2 - 3
    t = int(rng.integers(2, 5))                                      # stroke thickness
    value = int(rng.integers(170, 256))
    if cls == 0:
        cv2.circle(img, (c, c), r, value, -1)
    elif cls == 1:
        cv2.circle(img, (c, c), r, value, t)
    elif cls in (2, 3):
        cv2.rectangle(img, (3, 3), (side - 4, side - 4), value, -1 if cls == 2 else t)
    elif cls == 4:
        pts = np.array([[c, 3], [3, side - 4], [side - 4, side - 4]], np.int32)
        cv2.fillPoly(img, [pts], value)
    elif cls == 5:
        cv2.line(img, (c, 3), (c, side - 4), value, t)
        cv2.line(img, (3, c), (side - 4, c), value, t)
    elif cls in (6, 7):
        for k in range(3, side - 3, 7):
            a, b = ((3, k), (side - 4, k)) if cls == 6 else ((k, 3), (k, side - 4))
            cv2.line(img, a, b, value, t)
    elif cls == 8:
        cv2.line(img, (3, 3), (side - 4, side - 4), value, t + 2)
    else:
        cell = side // 4
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    img[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = value
    angle = float(rng.uniform(-30, 30))                              # a little variety
    rot = cv2.getRotationMatrix2D((c, c), angle, 1.0)
    return cv2.warpAffine(img, rot, (side, side))


def glyphs(count: int, rng: np.random.Generator, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``count`` glyphs (count, 28, 28) uint8 and their labels (count,), classes in turn."""
    labels = np.arange(count) % classes
    return np.stack([glyph(int(c), rng) for c in labels]), labels


def classification_image(cls: int, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: a background with 1-3 tinted glyphs of class ``cls``."""
    canvas = np.repeat(scenes.background(rng, (height, width))[:, :, None], 3, axis=2)
    for _ in range(rng.integers(1, 4)):
        side = int(rng.integers(min(height, width) // 5, min(height, width) // 2))
        item = cv2.resize(glyph(cls, rng), (side, side), interpolation=cv2.INTER_LINEAR) / 255.0
        y, x = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        tint = rng.uniform(120, 255, 3)
        window = canvas[y:y + side, x:x + side]
        window[:] = window * (1 - item[:, :, None]) + tint * item[:, :, None]
    return np.clip(canvas, 0, 255).astype(np.uint8)


def image_tree(out: Path, classes: int, per_class: dict[str, int], seed: int = 0) -> int:
    """``out/<split>/<class>/*.jpg``; returns the number of images written."""
    rng = np.random.default_rng(seed)
    written = 0
    for split, count in per_class.items():
        for cls in range(classes):
            folder = out / split / GLYPHS[cls]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = SIZES[(cls + i) % len(SIZES)]
                image = classification_image(cls, rng, w, h)
                Image.fromarray(image).save(folder / f"{split}_{cls}_{i:05d}.jpg", quality=90)
                written += 1
    return written


# what is written into <out>: staged name -> final name (the registry's roots: ade20k ->
# ADEChallengeData2016, coco -> coco)
TARGETS = {"imagenet_tree": "imagenet_tree", "ade20k": "ADEChallengeData2016", "coco": "coco"}


def generate(out: Path, classes: int, train: int, val: int, scene_count: int,
             seed: int = 0, force: bool = False) -> dict[str, int]:
    if not 1 <= classes <= len(GLYPHS):
        raise ValueError(f"--classes {classes}: choose 1..{len(GLYPHS)}")
    refuse_existing([out / name for name in TARGETS.values()], force)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out)                                # a killed run's staging folder
    staging = temp_name(out / "synthetic")
    try:
        n = image_tree(staging / "imagenet_tree", classes, {"train": train, "val": val}, seed)
        print(f"[synthetic] {n} JPEGs of {len(SIZES)} sizes, {classes} classes -> {out}/imagenet_tree")
        rng = np.random.default_rng(seed + 1)
        items, labels = glyphs(200, rng)
        for split, count in (("train", scene_count), ("val", max(1, scene_count // 4))):
            scenes.write_split(staging, split, count, items, labels, SCENE_SHAPES, threshold=48,
                               seed=seed, item_px=(60, 240), classes=list(GLYPHS))
        refuse_existing([out / name for name in TARGETS.values()], force)   # made meanwhile?
        for src, dst in TARGETS.items():
            replace_whole(staging / src, out / dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"[synthetic] {scene_count} + {max(1, scene_count // 4)} scenes of {SCENE_SHAPES} (h, w) "
          f"-> {out}/ADEChallengeData2016, {out}/coco")
    return {"images": n, "scenes": scene_count}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--train", type=int, default=40, help="training images per class")
    ap.add_argument("--val", type=int, default=10, help="validation images per class")
    ap.add_argument("--scenes", type=int, default=8, help="training scenes (val: a quarter)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true",
                    help="replace <out>/imagenet_tree, ADEChallengeData2016 and coco if they exist")
    args = ap.parse_args(argv)
    return run_cli(lambda: generate(args.out, args.classes, args.train, args.val, args.scenes,
                                    args.seed, args.force))


if __name__ == "__main__":
    sys.exit(main())
