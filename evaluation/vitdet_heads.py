"""ViTDet's Mask R-CNN heads (Li et al. arXiv 2203.16527) on torchvision's detector.

facebookresearch/detectron2 projects/ViTDet/configs/common/models/mask_rcnn_vitdet.py changes
detectron2's FPN Mask R-CNN in three places, built here from torchvision's modules (the
structures match; the inits are set to detectron2's where torchvision's differ):

- RPN head ``conv_dims=[-1, -1]``: two 3x3 convs at the input width, each with bias and ReLU,
  then 1x1 objectness and box-delta convs; every conv normal(std 0.01), bias 0
  (detectron2 modeling/proposal_generator/rpn.py ``StandardRPNHead``). torchvision's
  ``RPNHead(conv_depth=2)`` is exactly this.
- box head ``conv_dims=[256] * 4, fc_dims=[1024], conv_norm="LN"``: four 3x3 convs, no bias,
  each followed by LayerNorm over the channels of every position (detectron2 layers
  ``LayerNorm``, eps 1e-6, with bias: timm's ``LayerNorm2d``) and ReLU; flatten; fc + ReLU
  (detectron2 roi_heads/box_head.py ``FastRCNNConvFCHead``): torchvision's
  ``FastRCNNConvFCHead(norm_layer=LayerNorm2d)``. Init: convs ``c2_msra_fill`` (kaiming
  normal, fan_out, ReLU; torchvision's too), the fc ``c2_xavier_fill`` (kaiming uniform, a=1,
  bias 0; torchvision leaves nn.Linear's default: re-initialised here).
- box predictor (detectron2 roi_heads/fast_rcnn.py ``FastRCNNOutputLayers``): class scores
  normal(std 0.01), box deltas normal(std 0.001), biases 0 (torchvision's
  ``FastRCNNPredictor`` keeps nn.Linear's default: re-initialised).
- mask head ``conv_norm="LN"`` (detectron2 roi_heads/mask_head.py ``MaskRCNNConvUpsampleHead``):
  four 3x3 convs without bias + LayerNorm + ReLU (torchvision's ``MaskRCNNHeads(norm_layer=
  LayerNorm2d)``), a 2x2 stride-2 deconv + ReLU and a 1x1 per-class predictor
  (torchvision's ``MaskRCNNPredictor``); convs and deconv ``c2_msra_fill``, the predictor
  normal(std 0.001), bias 0 (torchvision: kaiming for all three, re-initialised).

``eval.detection.heads: torchvision`` keeps torchvision's default heads (one-conv RPN, two-fc
box head, mask head without norm) as the project ran them before: a departure kept for
comparison with earlier results, not the paper protocol.

RoI pooling (``PyramidRoIAlign``) is detectron2's ``ROIPooler`` (modeling/poolers.py) with
``pooler_type="ROIAlignV2"``, ``sampling_ratio=0`` (configs/common/models/mask_rcnn_fpn.py; 7 x 7
for boxes, 14 x 14 for masks): ``roi_align(aligned=True)`` (the half-pixel shift) with adaptive
sampling, each box pooled from level floor(4 + log2(sqrt(area) / 224)) clamped to the pyramid.
``eval.detection.roi_align: v1`` keeps torchvision's ``MultiScaleRoIAlign`` numbers
(``aligned=False``, sampling ratio 2). Both take the levels' scales from the pyramid (1 /
stride), not torchvision's inference: it guesses them once, from the first batch's largest
*unpadded* image height, so a first batch of small (jittered) or landscape images fixes
2x-wrong scales for the whole run.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

HEADS = ("vitdet", "torchvision")
# detectron2's get_norm("LN"): LayerNorm over C of (N, C, H, W), eps 1e-6, affine
ChannelLayerNorm = partial(LayerNorm2d, eps=1e-6)


def c2_xavier_fill(layer: nn.Module) -> None:
    """fvcore's ``c2_xavier_fill``: Caffe2's XavierFill = kaiming uniform with a = 1, bias 0."""
    nn.init.kaiming_uniform_(layer.weight, a=1)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def c2_msra_fill(layer: nn.Module) -> None:
    """fvcore's ``c2_msra_fill``: kaiming normal, fan_out, ReLU gain, bias 0."""
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def normal_fill(layer: nn.Module, std: float) -> None:
    nn.init.normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def rpn_head(kind: str, channels: int, num_anchors: int) -> RPNHead:
    """(B, C, h, w) per level -> objectness (B, A, h, w), deltas (B, 4A, h, w)."""
    return RPNHead(channels, num_anchors, conv_depth=2 if kind == "vitdet" else 1)


def box_head(kind: str, channels: int, fc_dim: int, pooled: int = 7) -> nn.Module:
    """RoI features (R, C, 7, 7) -> (R, fc_dim)."""
    if kind == "torchvision":
        return TwoMLPHead(channels * pooled * pooled, fc_dim)
    head = FastRCNNConvFCHead((channels, pooled, pooled), [channels] * 4, [fc_dim], norm_layer=ChannelLayerNorm)
    for m in head.modules():
        if isinstance(m, nn.Linear):
            c2_xavier_fill(m)
    return head


def box_predictor(kind: str, fc_dim: int, num_classes: int) -> FastRCNNPredictor:
    """(R, fc_dim) -> class logits (R, K), class-specific deltas (R, 4K)."""
    predictor = FastRCNNPredictor(fc_dim, num_classes)
    if kind == "vitdet":
        normal_fill(predictor.cls_score, 0.01)
        normal_fill(predictor.bbox_pred, 0.001)
    return predictor


def mask_head(kind: str, channels: int) -> MaskRCNNHeads:
    """RoI features (R, C, 14, 14) -> (R, C, 14, 14): four 3x3 convs."""
    return MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=ChannelLayerNorm if kind == "vitdet" else None)


def mask_predictor(kind: str, channels: int, num_classes: int) -> MaskRCNNPredictor:
    """(R, C, 14, 14) -> per-class mask logits (R, K, 28, 28): deconv + ReLU + 1x1 conv."""
    predictor = MaskRCNNPredictor(channels, channels, num_classes)
    if kind == "vitdet":
        c2_msra_fill(predictor.conv5_mask)
        normal_fill(predictor.mask_fcn_logits, 0.001)
    return predictor


class PyramidRoIAlign(MultiScaleRoIAlign):
    """Boxes (image pixels, per image (n_i, 4) xyxy) on pyramid maps "0".."L-1" (B, C, H_l, W_l)
    -> (sum n_i, C, size, size): each box from its FPN level (torchvision's ``LevelMapper``,
    canonical 224 px at level 4: detectron2's ``assign_boxes_to_levels``, whose epsilon differs
    only within ~1e-6 of a level boundary), by ``roi_align`` at that level's fixed scale.
    A ``MultiScaleRoIAlign`` because torchvision's FasterRCNN accepts only that type;
    ``forward`` mirrors torchvision's ``_multiscale_roi_align`` (ops/poolers.py: one
    ``torch.where`` per level, as there) with ``aligned`` passed through."""

    def __init__(self, output_size: int, scales: Sequence[float], aligned: bool, sampling_ratio: int) -> None:
        super().__init__([str(i) for i in range(len(scales))], output_size, sampling_ratio)
        self.aligned = aligned
        self.scales = list(scales)                 # set: torchvision's forward would infer them
        levels = [round(-math.log2(s)) for s in scales]
        self.map_levels = LevelMapper(levels[0], levels[-1])

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        levels = self.map_levels(boxes)
        maps = [x[name] for name in self.featmap_names]
        out = maps[0].new_zeros((len(rois), maps[0].shape[1], *self.output_size))
        for level, (fmap, scale) in enumerate(zip(maps, self.scales)):
            idx = torch.where(levels == level)[0]
            out[idx] = roi_align(fmap, rois[idx], self.output_size, scale, self.sampling_ratio,
                                 self.aligned).to(out.dtype)
        return out


def roi_pool(kind: str, output_size: int, scales: Sequence[float]) -> PyramidRoIAlign:
    """``v2``: detectron2's ROIAlignV2 (aligned, adaptive sampling); ``v1``: torchvision's
    ``MultiScaleRoIAlign`` arithmetic (not aligned, 2 x 2 samples per bin). ``scales``: 1 /
    stride of each pyramid level, finest first (powers of two)."""
    v2 = kind == "v2"
    return PyramidRoIAlign(output_size, scales, aligned=v2, sampling_ratio=0 if v2 else 2)
