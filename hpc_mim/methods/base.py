"""The contract every pre-training method fulfils; the trainer relies on nothing else."""
from __future__ import annotations

import torch
from torch import nn


class MIMMethod(nn.Module):
    """One pre-training method = one module.

    - ``encoder``: the ``ViTEncoder`` that is exported for evaluation.
    - ``forward(batch) -> dict``: ``"loss"`` (scalar to minimise) plus every named loss term
      (listed in ``terms``), so the trainer logs them all without knowing them. ``batch`` has
      ``"image"`` (B, C, S, S) with S = ``input_size``, and one more tensor per name in
      ``extra_views`` (a second augmented view of the same images, see hpc_mim/data/views.py).
    - ``on_optimizer_step(progress)``: called by the trainer after each optimizer step with the
      training progress in [0, 1]; EMA teachers update here. The trainer gathers the tensors
      listed by ``ema_parameters`` first (ZeRO-3 partitions them), so plain tensor code is right.
    """

    encoder: nn.Module
    terms: tuple[str, ...] = ()
    extra_views: tuple[str, ...] = ()
    # the networks ``train.compile`` compiles: whole modules the forward calls, never the
    # masking or noise draws (compiled random ops would draw from another generator than the
    # one checkpoints save, and exact resume would be lost)
    compiled: tuple[str, ...] = ("encoder", "decoder")

    @property
    def input_size(self) -> int:
        """Side of the training crops the loader must produce."""
        return self.encoder.patch_embed.img_size[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compile_networks(self, device: torch.device) -> list[str]:
        """``torch.compile`` each module named in ``compiled`` in place (``nn.Module.compile``:
        parameters and state-dict keys unchanged, so checkpoints and the export are the same).
        On CPU, timm's attention also takes its explicit softmax path, which inductor fuses:
        for the demo ViT's 13-50 tokens SDPA's CPU flash kernel cost more (benchmarks/bench.py).
        On CUDA the fused SDPA kernel stays. Returns the names compiled."""
        names = [n for n in self.compiled if isinstance(getattr(self, n, None), nn.Module)]
        for name in names:
            module = getattr(self, name)
            if device.type == "cpu":
                for sub in module.modules():
                    if hasattr(sub, "fused_attn"):
                        sub.fused_attn = False
            module.compile()
        return names

    @torch.no_grad()
    def on_optimizer_step(self, progress: float) -> None:
        return None

    def ema_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(read, written) parameters of ``on_optimizer_step``; none by default."""
        return [], []
