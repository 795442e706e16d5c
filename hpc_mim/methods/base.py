"""The contract every pre-training method fulfils; the trainer relies on nothing else."""
from __future__ import annotations

import torch
from torch import nn


class MIMMethod(nn.Module):
    """One pre-training method = one module.

    - ``encoder``: the ``ViTEncoder`` that is exported for evaluation.
    - ``forward(batch) -> dict``: ``"loss"`` (scalar to minimise) plus every named loss term,
      so the trainer logs them all without knowing them.
    - ``on_optimizer_step(progress)``: called by the trainer after each optimizer step with the
      training progress in [0, 1] (EMA teachers update here). A no-op by default.
    """

    encoder: nn.Module

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def on_optimizer_step(self, progress: float) -> None:
        return None
