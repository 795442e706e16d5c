"""Large-scale jitter (LSJ), ViTDet's detection training augmentation (Ghiasi et al. arXiv
2012.07177; Li et al. arXiv 2203.16527), as facebookresearch/detectron2 runs it:
projects/ViTDet/configs/common/coco_loader_lsj.py chains ``RandomFlip`` (first),
``ResizeScale(min_scale=0.1, max_scale=2.0, target 1024 x 1024)`` and
``FixedSizeCrop(1024, pad=False)`` (detectron2/data/transforms/augmentation_impl.py), with
``recompute_boxes=True`` and ``filter_empty_instances``; the model pads every batch to a
1024 x 1024 square (``square_pad``). Evaluation resizes the longest side to 1024
(``ResizeShortestEdge(1024, max_size=1024)``), which torchvision's detector transform does.

One call, for a target ``size`` T (``eval.detection.image_size``) and an image of H x W:
- scale s ~ U(min, max); r = min(T s / H, T s / W) (aspect ratio kept, the image fits a
  T s square); output (round(H r), round(W r)): image bilinear (antialiased, as PIL's), masks
  nearest, boxes x r_w, y r_h with r_w = W' / W, r_h = H' / H (detectron2's ResizeTransform).
- crop: offset = round(max(H' - T, 0) u), round(max(W' - T, 0) u) with ONE u ~ U(0, 1) for
  both axes (as detectron2's FixedSizeCrop), size min(T, H') x min(T, W'); boxes shifted and
  clipped to the crop; no padding here (the batch is padded to T x T after normalisation).
- boxes from the cropped masks when there are masks (``recompute_boxes``; the bitmask tight box,
  right / bottom edge + 1 as detectron2's BitMasks), then instances with an empty box
  (width or height <= 1e-5) dropped with their labels and masks.

The draws come from torch's global generator, which ``SeededSamples`` (hpc_mim/data/dense.py)
seeds per (seed, epoch, index): the same jitter on resume, on any worker.

Shapes: image (C, H, W) -> (C, h <= T, w <= T); boxes (K, 4) xyxy; masks (K, H, W) -> (K', h, w).
"""
from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

EMPTY = 1e-5            # detectron2's Boxes.nonempty threshold (filter_empty_instances)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(K, H, W) -> (K, 4) xyxy fp32 tight boxes of the non-zero pixels, x2 / y2 one past the
    last pixel (detectron2 ``BitMasks.get_bounding_boxes``); an empty mask gives zeros."""
    rows, cols = masks.flatten(0, -3).ne(0).any(dim=2), masks.flatten(0, -3).ne(0).any(dim=1)
    y1, x1 = rows.int().argmax(1), cols.int().argmax(1)                      # first non-empty
    y2, x2 = rows.shape[1] - rows.flip(1).int().argmax(1), cols.shape[1] - cols.flip(1).int().argmax(1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return boxes * rows.any(1, keepdim=True)


class LargeScaleJitter:
    """ResizeScale + FixedSizeCrop (pad=False) + recomputed boxes + empty instances dropped, on
    a (tv_tensors.Image, target dict with ``boxes`` / ``labels`` / optional ``masks``) pair."""

    def __init__(self, size: int, min_scale: float = 0.1, max_scale: float = 2.0) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"scale range [{min_scale}, {max_scale}]: need 0 < min <= max")
        self.size, self.min_scale, self.max_scale = size, min_scale, max_scale

    def draw(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """The resized size (H', W') and the crop (top, left, height, width) for an H x W image."""
        t = self.size
        s = self.min_scale + (self.max_scale - self.min_scale) * float(torch.rand(()))
        r = min(t * s / h, t * s / w)
        oh, ow = round(h * r), round(w * r)
        u = float(torch.rand(()))
        top, left = round(max(oh - t, 0) * u), round(max(ow - t, 0) * u)
        return (oh, ow), (top, left, min(t, oh), min(t, ow))

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        h, w = image.shape[-2:]
        (oh, ow), (top, left, ch, cw) = self.draw(h, w)
        image = F.resize(image, [oh, ow], antialias=True)[..., top:top + ch, left:left + cw]
        target = dict(target)
        boxes = target["boxes"].as_subclass(torch.Tensor).float()
        boxes = boxes * torch.tensor([ow / w, oh / h, ow / w, oh / h])
        boxes = boxes - torch.tensor([left, top, left, top], dtype=torch.float32)
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([cw, ch, cw, ch], dtype=torch.float32))
        if "masks" in target:
            masks = F.resize(target["masks"], [oh, ow], interpolation=InterpolationMode.NEAREST)
            masks = masks[..., top:top + ch, left:left + cw]
            boxes = mask_boxes(masks)
        keep = ((boxes[:, 2] - boxes[:, 0]) > EMPTY) & ((boxes[:, 3] - boxes[:, 1]) > EMPTY)
        target["boxes"] = tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(ch, cw))
        target["labels"] = target["labels"][keep]
        if "masks" in target:
            target["masks"] = tv_tensors.Mask(masks[keep])
        return tv_tensors.Image(image), target
