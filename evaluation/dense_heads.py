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
  Convs and classifiers are initialised as mmcv's ConvModule / mmseg's ``conv_seg``.
- ``FCNHead``: mmseg's auxiliary head of the same configs (one conv-BN-ReLU on one neck map,
  256 channels), trained alongside UperNet with loss weight 0.4 and dropped at inference.
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
    fp32, the ReLU in place on it. Initialised as ConvModule does: the conv by
    ``kaiming_init`` (normal, fan_out, ReLU gain), the norm to weight 1 and bias 0."""
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, SyncBatchNorm2d(cout), nn.ReLU(inplace=True))


def classifier(channels: int, num_classes: int) -> nn.Conv2d:
    """mmseg's ``conv_seg`` (BaseDecodeHead): a 1x1 conv initialised normal(0, 0.01), bias 0."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv


class UperNetHead(nn.Module):
    """Four ViT block maps (B, D, h, w) -> class logits (B, num_classes, h * f0, w * f0): the
    rescales (mmseg's Feature2Pyramid neck) then mmseg's UPerHead (pool_scales (1, 2, 3, 6),
    ``channels`` wide, Dropout2d 0.1 before the classifier, bilinear with align_corners False).
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
        self.classifier = classifier(channels, num_classes)

    def pyramid(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Block maps -> the neck's maps (B, D, h * f, w * f), finest first."""
        return [r(x) for r, x in zip(self.rescales, blocks)]

    def decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The neck's maps -> logits at the finest map's size."""
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

    def forward(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        return self.decode(self.pyramid(blocks))


class FCNHead(nn.Module):
    """mmseg's auxiliary FCNHead as the BEiT / MAE UperNet configs set it (upernet_mae.py:
    ``num_convs=1, kernel_size=3, concat_input=False, channels=256, dropout_ratio=0.1``, SyncBN):
    one neck map (B, D, h, w) -> logits (B, num_classes, h, w), conv-BN-ReLU, Dropout2d, 1x1
    classifier. Trained with loss weight 0.4 and not used at inference."""

    def __init__(self, dim: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = conv_bn_relu(dim, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


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
