"""detectron2's box regression losses (ViTDet's) on torchvision's Mask R-CNN.

ViTDet's configs (facebookresearch/detectron2 projects/ViTDet/configs/common/models/
mask_rcnn_vitdet.py on configs/common/models/mask_rcnn_fpn.py) keep detectron2's defaults,
``box_reg_loss_type="smooth_l1"`` with ``smooth_l1_beta=0.0``, which detectron2's
``smooth_l1_loss`` computes as plain L1 |delta - target|:

- RPN (modeling/proposal_generator/rpn.py ``RPN.losses``): L1 summed over the sampled positive
  anchors and binary cross-entropy summed over all sampled anchors, both divided by
  ``batch_size_per_image`` x images (256 x N), however many anchors were sampled.
- Fast R-CNN (modeling/roi_heads/fast_rcnn.py ``FastRCNNOutputLayers.box_reg_loss``): L1 of
  the ground-truth class's deltas summed over the foreground RoIs, divided by the number of
  sampled RoIs (foreground and background); classification: mean cross-entropy.

torchvision (models/detection/rpn.py ``compute_loss``, roi_heads.py ``fastrcnn_loss``) uses
smooth L1 with beta 1/9, and in the RPN divides by the anchors actually sampled and averages the
cross-entropy over them. ``use_l1_box_losses`` switches a built detector to detectron2's;
``eval.detection.box_loss: smooth_l1`` leaves torchvision's (a departure, kept for comparison).
Both compute the losses with the same host syncs as torchvision's (its ``torch.where`` index
selections): none is added.
"""
from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork


class L1RPN(RegionProposalNetwork):
    """torchvision's RPN with detectron2's losses (``compute_loss`` mirrors torchvision's)."""

    def compute_loss(self, objectness: torch.Tensor, pred_bbox_deltas: torch.Tensor,
                     labels: list[torch.Tensor], regression_targets: list[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """objectness (A, 1) and deltas (A, 4) over the A anchors of all images; per image
        labels (A_i,): 1 / 0 / -1 (ignored), targets (A_i, 4) -> (objectness, box) losses."""
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(neg))[0]])
        normalizer = self.fg_bg_sampler.batch_size_per_image * len(labels)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], torch.cat(regression_targets)[pos], reduction="sum")
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], torch.cat(labels)[sampled], reduction="sum")
        return objectness_loss / normalizer, box_loss / normalizer


def fastrcnn_l1_loss(class_logits: torch.Tensor, box_regression: torch.Tensor, labels: list[torch.Tensor],
                     regression_targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ``fastrcnn_loss`` with detectron2's L1: logits (R, K), deltas (R, 4K), per
    image labels (R_i,) (0 = background) and targets (R_i, 4) -> (classification, box) losses."""
    labels_all = torch.cat(labels)
    pos = torch.where(labels_all > 0)[0]
    deltas = box_regression.reshape(len(labels_all), -1, 4)[pos, labels_all[pos]]
    box_loss = F.l1_loss(deltas, torch.cat(regression_targets)[pos], reduction="sum")
    return F.cross_entropy(class_logits, labels_all), box_loss / labels_all.numel()


def _forward_with_loss(loss: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> types.FunctionType:
    """``RoIHeads.forward`` itself (its code object, not a copy of its source) with the global
    name ``fastrcnn_loss`` it calls resolved to ``loss``: torchvision calls that module-level
    function directly, so no method can override it, and rebinding it in torchvision's module
    would change every other model of the process."""
    forward = RoIHeads.forward
    if "fastrcnn_loss" not in forward.__code__.co_names:
        raise ImportError("torchvision's RoIHeads.forward no longer calls fastrcnn_loss")
    scope = {**forward.__globals__, "fastrcnn_loss": loss}
    return types.FunctionType(forward.__code__, scope, forward.__name__, forward.__defaults__,
                              forward.__closure__)


class L1RoIHeads(RoIHeads):
    """torchvision's RoI heads with detectron2's Fast R-CNN box loss."""
    forward = _forward_with_loss(fastrcnn_l1_loss)


def use_l1_box_losses(rcnn: GeneralizedRCNN) -> None:
    """Gives a built torchvision detector detectron2's losses. The subclasses add no state:
    changing the class keeps every setting FasterRCNN's constructor gave the modules."""
    rcnn.rpn.__class__ = L1RPN
    rcnn.roi_heads.__class__ = L1RoIHeads
