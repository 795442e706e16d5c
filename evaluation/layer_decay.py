"""Layer-wise lr decay for the trained evaluations (fine-tuning, segmentation, detection).

BEiT / MAE (arXiv 2111.06377 App. A.3): the learning rate of encoder layer i is scaled by
``decay ** (num_layers - i)``: the embeddings are layer 0, block b is layer b + 1, and the
final norm and every task layer get scale 1. timm's ``param_groups_layer_decay`` does the
grouping from the model's ``group_matcher``; its schedulers multiply each group's lr by
``lr_scale``. Weight decay skips 1-D parameters and the cls token.
"""
from __future__ import annotations

from typing import Any

from timm.optim import param_groups_layer_decay
from torch import nn

NO_WEIGHT_DECAY = ("*cls_token",)


class EncoderModel(nn.Module):
    """Base of the evaluation models: a pre-trained ViTEncoder at ``encoder_prefix`` plus task
    layers. Gives timm the encoder's grouping under that prefix."""
    encoder_prefix = "encoder."

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        encoder = self.get_submodule(self.encoder_prefix.rstrip("."))
        return encoder.group_matcher(coarse, prefix=self.encoder_prefix)

    def param_groups(self, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups, each with ``lr_scale`` and ``weight_decay``."""
        return param_groups_layer_decay(self, weight_decay, NO_WEIGHT_DECAY, layer_decay=layer_decay)
