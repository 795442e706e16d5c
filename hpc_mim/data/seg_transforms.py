"""mmsegmentation's ADE20K pipelines (open-mmlab/mmsegmentation: configs/_base_/datasets/ade20k.py,
mmseg/datasets/pipelines/transforms.py; mmcv's ``imrescale`` / ``rescale_size``), the data side
of the BEiT / MAE UperNet protocol (MAE arXiv 2111.06377 App. A.4).

Training, on a uint8 image (3, H, W) and its uint8 label (H, W):

1. ``Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``: r ~ U(0.5, 2),
   the image rescaled by min(int(2048 r) / long side, int(512 r) / short side) (the long-side
   bound only binds beyond 4:1), sizes rounded as mmcv's ``int(x * f + 0.5)``; bilinear without
   antialiasing (cv2's INTER_LINEAR), the label by nearest neighbour. ``scale`` is the short
   side (512); the long side is 4 x scale, as mmseg's (2048, 512).
2. ``RandomCrop(crop, cat_max_ratio=0.75)``: a uniform offset (a smaller image is kept whole,
   not padded yet); up to 10 redraws while the crop's most frequent class (ignore left out)
   covers >= 75% of its labelled pixels or it holds a single class; the 11th box is kept as is.
3. ``RandomFlip(prob=0.5)``.
4. ``PhotoMetricDistortion`` (hpc_mim/data/photometric.py), optional (``photometric``).
5. ``Normalize`` then ``Pad(size=crop, pad_val=0, seg_pad_val=255)``: padded at the bottom and
   right, after normalisation, so the padding is 0 in the normalised image (the mean colour),
   its labels ignored.

Evaluation: ``Resize((2048, 512), keep_ratio=True)`` (the same rescale with r = 1), normalised.

Every random draw comes from torch's global generator, which ``SeededSamples``
(hpc_mim/data/dense.py) seeds per (seed, epoch, sample), so a resumed job sees the same crops.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from hpc_mim.data.photometric import photometric_distortion

LONG_PER_SHORT = 4              # mmseg's img_scale (2048, 512): the long-side bound per short side
RATIO_RANGE = (0.5, 2.0)
CROP_TRIES = 10                 # mmseg's RandomCrop: redraws while the class ratio is too high


def rescaled_size(h: int, w: int, long: int, short: int) -> tuple[int, int]:
    """(h', w') of mmcv's ``imrescale`` to the bounds (long, short), aspect ratio kept."""
    f = min(long / max(h, w), short / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def crop_box(label: torch.Tensor, crop: int, cat_max_ratio: float, ignore: int) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of mmseg's ``RandomCrop`` on a label (H, W): offsets uniform in
    [0, max(H - crop, 0)] (row first, as its ``get_crop_bbox``), redrawn up to 10 times while
    one class covers >= cat_max_ratio of the labelled pixels or only one class is present."""
    h, w = label.shape

    def draw() -> tuple[int, int, int, int]:
        y = int(torch.randint(0, max(h - crop, 0) + 1, ()))
        x = int(torch.randint(0, max(w - crop, 0) + 1, ()))
        return y, y + crop, x, x + crop

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(CROP_TRIES):
            y1, y2, x1, x2 = box
            counts = torch.bincount(label[y1:y2, x1:x2].flatten().long(), minlength=ignore + 1)
            counts[ignore] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def _resize(image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]):
    image = TF.resize(image, list(size), InterpolationMode.BILINEAR, antialias=False)
    if label is not None:
        label = TF.resize(label[None], list(size), InterpolationMode.NEAREST)[0]
    return image, label


def _normalize(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> fp32 (image / 255 - mean) / std; mean and std (3, 1, 1) in [0, 1] units."""
    return (image.float() / 255.0 - mean) / std


class SegmentationTrain:
    """(uint8 image (3, H, W), uint8 label (H, W)) -> (fp32 image (3, crop, crop), uint8 label
    (crop, crop)), the padding labelled ``ignore``."""

    def __init__(self, scale: int, crop: int, mean: Sequence[float], std: Sequence[float],
                 cat_max_ratio: float = 0.75, photometric: bool = True, ignore: int = 255) -> None:
        self.scale, self.crop, self.ignore = scale, crop, ignore
        self.cat_max_ratio, self.photometric = cat_max_ratio, photometric
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)
        low, high = RATIO_RANGE
        r = low + (high - low) * torch.rand((), dtype=torch.float64).item()
        bounds = int(LONG_PER_SHORT * self.scale * r), int(self.scale * r)
        image, label = _resize(image, label, rescaled_size(*image.shape[-2:], *bounds))
        y1, y2, x1, x2 = crop_box(label, self.crop, self.cat_max_ratio, self.ignore)
        image, label = image[:, y1:y2, x1:x2], label[y1:y2, x1:x2]
        if torch.rand(()) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric:
            image = photometric_distortion(image)
        image = _normalize(image, self.mean, self.std)
        pad = (0, self.crop - image.shape[-1], 0, self.crop - image.shape[-2])   # right, bottom
        return F.pad(image, pad, value=0.0), F.pad(label, pad, value=self.ignore)


class SegmentationEval:
    """uint8 image (3, H, W) rescaled to the (4 x scale, scale) bounds and normalised; the label
    is left at its own size (predictions are resized to it)."""

    def __init__(self, scale: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.scale = scale
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.as_subclass(torch.Tensor)
        size = rescaled_size(*image.shape[-2:], LONG_PER_SHORT * self.scale, self.scale)
        image, _ = _resize(image, None, size)
        return _normalize(image, self.mean, self.std), label
