"""Readers of the real ADE20K and COCO layouts for the dense evaluations.

- ``ADE20K``: ``images/{training,validation}/*.jpg`` with ``annotations/<same>/*.png`` of the
  same stem; labels 1..N are classes, 0 is "other" and ignored (mmsegmentation's
  ``reduce_zero_label``: 0 -> 255, k -> k - 1).
- ``coco_detection``: ``<split>2017/`` images + ``annotations/instances_<split>2017.json``,
  read by torchvision's CocoDetection (pycocotools) and wrapped for transforms v2, so boxes and
  masks follow flips and resizes; training optionally with ViTDet's large-scale jitter
  (hpc_mim/data/lsj.py).

Segmentation augmentation is mmsegmentation's ADE20K pipeline (hpc_mim/data/seg_transforms.py,
with its photometric distortion in hpc_mim/data/photometric.py); detection augmentation uses
torchvision.transforms.v2, which moves image, masks and boxes together.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from hpc_mim.data.lsj import LargeScaleJitter
from hpc_mim.data.seg_transforms import SegmentationEval, SegmentationTrain

IGNORE = 255
ADE_SPLITS = {"train": "training", "val": "validation"}


class ADE20K(Dataset):
    """(image uint8 (3, H, W), label (H, W) long in [0, N) or 255) pairs of one split."""

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None,
                 max_samples: int = 0) -> None:
        root = Path(root)
        images = sorted((root / "images" / ADE_SPLITS[split]).glob("*.jpg"))
        if not images:
            raise FileNotFoundError(f"{root / 'images' / ADE_SPLITS[split]}: no .jpg images "
                                    "(expected the ADE20K layout)")
        self.images = images[:max_samples] if max_samples else images
        self.labels = [root / "annotations" / ADE_SPLITS[split] / f"{p.stem}.png" for p in self.images]
        missing = [str(p) for p in self.labels if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} annotation(s) missing, e.g. {missing[0]}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.images[i]) as im:
            image = tv_tensors.Image(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
        with Image.open(self.labels[i]) as im:
            raw = torch.from_numpy(np.array(im, dtype=np.uint8))                     # (H, W)
        label = tv_tensors.Mask(raw - 1)       # uint8 wrap-around: 0 -> 255 (ignore), k -> k - 1
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label.long()


def segmentation_transform(train: bool, scale: int, crop: int, mean: Sequence[float],
                           std: Sequence[float], photometric: bool = True,
                           cat_max_ratio: float = 0.75) -> Callable:
    """mmsegmentation's ADE20K pipeline at ``scale`` (hpc_mim/data/seg_transforms.py): training
    rescales within (4 x scale, scale) x U(0.5, 2.0), takes a random ``crop`` (``cat_max_ratio``),
    flips, distorts colours (``photometric``), normalises and pads with ignore; evaluation
    rescales the image only (predictions are compared at the label's own size)."""
    if not train:
        return SegmentationEval(scale, mean, std)
    return SegmentationTrain(scale, crop, mean, std, cat_max_ratio, photometric, IGNORE)


def coco_detection(root: str | Path, split: str, train: bool, max_samples: int = 0,
                   lsj: tuple[int, float, float] | None = None) -> Dataset:
    """COCO instances of one split as (image float (3, H, W) in [0, 1], target dict with boxes
    (K, 4) xyxy, labels (K,), masks (K, H, W) when annotated, image_id). Training drops images
    without annotations (as detectron2 does) and flips; ``lsj`` = (size, min_scale, max_scale)
    then applies ViTDet's large-scale jitter after the flip (hpc_mim/data/lsj.py, which also
    drops the emptied instances as detectron2 does)."""
    root = Path(root)
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    ops: list[Any] = [v2.ToImage()]
    if train:
        ops.append(v2.RandomHorizontalFlip())
        if lsj is not None:
            ops.append(LargeScaleJitter(*lsj))
    ops += [v2.ToDtype(torch.float32, scale=True)]
    if not (train and lsj is not None):
        ops.append(v2.SanitizeBoundingBoxes())
    dataset = CocoDetection(str(root / f"{split}2017"), str(ann_file), transforms=v2.Compose(ops))
    keys = ("boxes", "labels", "image_id") + (("masks",) if has_masks(dataset.coco) else ())
    if train:
        dataset.ids = [i for i in dataset.ids if dataset.coco.getAnnIds(imgIds=i, iscrowd=False)]
    if max_samples:
        dataset.ids = dataset.ids[:max_samples]
    return wrap_dataset_for_transforms_v2(dataset, target_keys=keys)


def coco_of(dataset: Dataset) -> Any:
    """The pycocotools ``COCO`` index behind a dataset made by ``coco_detection``."""
    return dataset._dataset.coco            # the transforms-v2 wrapper keeps the original here


def has_masks(coco) -> bool:
    """True when every annotation has a segmentation (then Mask R-CNN, else Faster R-CNN)."""
    anns = coco.dataset.get("annotations", [])
    return bool(anns) and all(a.get("segmentation") for a in anns)


def num_categories(coco) -> int:
    """Classifier size for torchvision's detectors: the largest category id + 1 (0 = background),
    so COCO's sparse ids (1..90) map to outputs without a table."""
    return max(coco.getCatIds()) + 1


def collate_pairs(batch: list[tuple[Any, Any]]) -> tuple[list, list]:
    """Detection batches stay lists: images differ in size, targets in instance count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# ------------------------------------------------------------------ resumable order

def draw_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy's SeedSequence hash: independent streams)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


class SeededSamples(Dataset):
    """``samples[(epoch, i)]`` is ``dataset[i]`` with its random augmentation drawn from a
    generator seeded by (seed, epoch, i): the same crop and flip whichever worker decodes it and
    whether or not the run was interrupted before (torchvision's v2 transforms draw from
    torch's global generator, forked here so the caller's stream is untouched)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed(self.seed, epoch, i))
            return self.dataset[i]


def shard_batches(n: int, micro: int, rank: int, world: int, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches of ``epoch`` as lists of (epoch, index) keys: a permutation of
    the ``n`` samples drawn from (seed, epoch), cut into global batches of micro x world, of
    which rank r takes the r-th slice; the remainder is dropped."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(draw_seed(seed, epoch))).tolist()
    per_step = micro * world
    return [[(epoch, i) for i in order[b * per_step + rank * micro:b * per_step + (rank + 1) * micro]]
            for b in range(n // per_step)]
