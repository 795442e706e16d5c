"""Heads that turn a plain ViT's single-scale tokens into a feature pyramid.

- ``rescale``: one token map resized by a power-of-two factor: log2(f) stride-2 transposed convs
  to upsample, a max-pool to downsample. The factors are relative to the token grid, as in
  mmsegmentation's Feature2Pyramid (``rescales``) and ViTDet (``scale_factors``): (4, 2, 1, 0.5)
  turns ViT-B/16 tokens into strides 4, 8, 16, 32. A patch-4 ViT on small images keeps the same
  factors (strides 1-8), so its last block still has a spatial map rather than one pixel.
- ``UperNetHead`` (Xiao et al. arXiv 1807.10221, mmsegmentation's UPerHead): pyramid pooling on
  the coarsest map, top-down lateral fusion, all levels fused at the finest. Every BatchNorm of
  it (the x4 rescale's included) is synchronised across ranks in training, as mmsegmentation's
  ``norm_cfg=dict(type='SyncBN')``: at batch 16 on 8 GPUs a rank holds 2 images, so a per-rank
  BatchNorm would normalise the pooled 1x1 PPM branch over 2 values per channel (at 16 GPUs over
  1: it raises), and each rank would keep, and evaluate its validation shard with, its own
  running statistics. ``SyncBatchNorm2d`` (hpc_mim/models/heads.py) also runs over gloo on CPU.
- ``SimpleFeaturePyramid`` (ViTDet, Li et al. arXiv 2203.16527): four levels from the last block
  only, each 1x1 + 3x3 convs with LayerNorm, plus a max-pooled extra level for the RPN.

Shapes: block features (B, D, h, w) -> maps (B, C, h * f, w * f) per factor f.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from hpc_mim.models.heads import SyncBatchNorm2d

FACTORS = (4.0, 2.0, 1.0, 0.5)


def rescale(dim: int, factor: float, norm: type[nn.Module]) -> nn.Module:
    """Token map (B, D, h, w) -> (B, D, h * factor, w * factor); factor a power of two."""
    if factor > 1:
        layers: list[nn.Module] = []
        for i in range(int(round(math.log2(factor)))):
            if i:
                layers += [norm(dim), nn.GELU()]
            layers.append(nn.ConvTranspose2d(dim, dim, 2, stride=2))
        return nn.Sequential(*layers)
    if factor < 1:
        return nn.MaxPool2d(int(round(1 / factor)))
    return nn.Identity()


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    """mmcv's ConvModule with SyncBN: (B, cin, h, w) -> (B, cout, h, w); the norm's output is
    fp32, the ReLU in place on it."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         SyncBatchNorm2d(cout), nn.ReLU(inplace=True))


class UperNetHead(nn.Module):
    """Four ViT block maps (B, D, h, w) -> class logits (B, num_classes, h * f0, w * f0).
    BatchNorms synced across ranks in training (``SyncBatchNorm2d``), plain in eval mode."""

    def __init__(self, dim: int, channels: int, num_classes: int, factors: Sequence[float] = FACTORS,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.rescales = nn.ModuleList(rescale(dim, f, SyncBatchNorm2d) for f in factors)
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(dim, channels, 1))
                                 for s in pool_scales)
        self.ppm_out = conv_bn_relu(dim + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in factors[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in factors[:-1])
        self.fuse = conv_bn_relu(len(factors) * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        maps = [r(x) for r, x in zip(self.rescales, blocks)]             # finest first
        top = maps[-1]
        pooled = [F.interpolate(p(top), top.shape[-2:], mode="bilinear", align_corners=False)
                  for p in self.ppm]
        levels = [lat(x) for lat, x in zip(self.laterals, maps[:-1])]
        levels.append(self.ppm_out(torch.cat([top, *pooled], dim=1)))
        for i in range(len(levels) - 1, 0, -1):                          # top-down pathway
            levels[i - 1] = levels[i - 1] + F.interpolate(
                levels[i], levels[i - 1].shape[-2:], mode="bilinear", align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = torch.cat([outs[0]] + [F.interpolate(o, size, mode="bilinear", align_corners=False)
                                       for o in outs[1:]], dim=1)
        return self.classifier(self.dropout(self.fuse(fused)))


class SimpleFeaturePyramid(nn.Module):
    """Last block's map (B, D, h, w) -> OrderedDict "0".."3" (B, C, h * f, w * f) per factor,
    and "pool" at half the last (torchvision's RPN / RoI naming)."""

    def __init__(self, dim: int, out_channels: int, factors: Sequence[float] = FACTORS) -> None:
        super().__init__()
        self.rescales = nn.ModuleList(rescale(dim, f, LayerNorm2d) for f in factors)
        self.outputs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                          LayerNorm2d(out_channels))
            for _ in factors)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = OrderedDict((str(i), out(r(x))) for i, (r, out)
                            in enumerate(zip(self.rescales, self.outputs)))
        feats["pool"] = F.max_pool2d(feats[str(len(self.outputs) - 1)], kernel_size=1, stride=2)
        return feats


def default_blocks(depth: int) -> list[int]:
    """The four blocks UperNet reads: [3, 5, 7, 11] of 12 (ViT-B), proportionally otherwise
    ([7, 11, 15, 23] of 24 as for ViT-L; [1, 2, 3, 5] of 6); a shallow encoder repeats blocks."""
    return [max(0, round((b + 1) * depth / 12) - 1) for b in (3, 5, 7, 11)]
