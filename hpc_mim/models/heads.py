"""Projection / prediction MLP heads of the self-distillation methods, and the synced
BatchNorm they use.

Why a hand-written synced BatchNorm: ``torch.nn.SyncBatchNorm`` refuses CPU tensors, and these
runs go over gloo on CPU as well as NCCL on GPUs. Statistics are all-reduced with the autograd
aware ``torch.distributed.nn.functional.all_reduce``, so gradients flow through the global
mean and variance exactly as in SyncBatchNorm (equal per-rank batch sizes, as DeepSpeed gives).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (N, C) whose batch statistics span all ranks while training.

    Statistics are fp32 whatever the input (bf16 under autocast) and two-pass: the global mean
    first, then the mean squared deviation from it. The one-pass E[x^2] - E[x]^2 cancels
    catastrophically when |mean| >> std (in bf16 already at a mean of ~20 std; it even goes
    negative). Two all-reduces of C floats each, autograd-aware. Output: fp32 (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(x)
        n = x.shape[0] * world
        mean = dist_fn.all_reduce(x.sum(0)) / n                               # (C,)
        centred = x - mean
        var = dist_fn.all_reduce((centred * centred).sum(0)) / n              # biased, as BN normalises
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / max(n - 1, 1), self.momentum)
            self.num_batches_tracked += 1
        y = centred / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, layers: int, norm: str,
             act: type[nn.Module], out_norm: bool = False) -> nn.Sequential:
    """``layers`` bias-free Linear layers with norm + activation between them.

    ``norm``: ``"ln"`` (token heads, any leading shape) or ``"bn"`` (pooled (N, C) heads, synced
    across ranks). LatentMIM: 3 layers, LayerNorm, GELU, output norm. LUT / BYOL: 2 layers,
    BatchNorm, ReLU.
    """
    def make_norm(dim: int) -> nn.Module:
        return nn.LayerNorm(dim) if norm == "ln" else SyncBatchNorm1d(dim)

    dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if i < layers - 1:
            mods += [make_norm(dims[i + 1]), act()]
    if out_norm:
        mods.append(make_norm(out_dim))
    return nn.Sequential(*mods)
