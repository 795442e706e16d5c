"""Projection / prediction MLP heads of the self-distillation methods, and the synced
BatchNorm they (and UperNet, evaluation/dense_heads.py) use.

Why a hand-written synced BatchNorm: ``torch.nn.SyncBatchNorm`` refuses CPU tensors, and these
runs go over gloo on CPU as well as NCCL on GPUs. Statistics are all-reduced with the autograd
aware ``torch.distributed.nn.functional.all_reduce``, so gradients flow through the global
mean and variance exactly as in SyncBatchNorm; each rank's element count travels in the same
all-reduce as its sums, so unequal per-rank batches are normalised exactly too.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over (N, C, *) whose batch statistics span all ranks while training: one
    mean and variance per channel over every dim but the channel dim (1), on every rank.

    Statistics are fp32 whatever the input (bf16 under autocast) and two-pass: the global mean
    first, then the mean squared deviation from it. The one-pass E[x^2] - E[x]^2 cancels
    catastrophically when |mean| >> std (in bf16 already at a mean of ~20 std; it even goes
    negative). Two autograd-aware all-reduces per forward (and two in backward), whatever the
    world size: [per-channel sums, element count] (C + 1 floats), then the per-channel squared
    deviations (C floats). The count is this rank's N * prod(spatial), all-reduced rather than
    assumed equal (fp32: exact up to 2^24 = 16.7M elements per channel; beyond, a relative
    error of 6e-8). The running statistics are updated from the all-reduced values, which are
    bitwise equal on every rank, so every rank keeps the same ones and evaluates with them.

    Eval mode, or a single process: plain BatchNorm (on fp32 input). Output: fp32, shape of x.
    ``torch.nn.SyncBatchNorm`` (CUDA only) does the same with one all-gather of per-rank
    (mean, invstd, count) instead, single-pass Welford per rank."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        x = x.float()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]                        # all but the channels
        shape = (1, -1) + (1,) * (x.dim() - 2)                # (C,) -> broadcast over x
        count = x.new_full((1,), x.numel() // x.shape[1])     # this rank's values per channel
        sums = dist_fn.all_reduce(torch.cat([x.sum(dims), count]))           # (C + 1,)
        n = sums[-1]                                          # global count, a tensor: no host sync
        mean = sums[:-1] / n                                                  # (C,)
        centred = x - mean.view(shape)
        var = dist_fn.all_reduce((centred * centred).sum(dims)) / n          # biased, as BN normalises
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (1.0 / self.num_batches_tracked.float() if self.momentum is None
                            else self.momentum)            # None: cumulative average, as BatchNorm
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), momentum)
        y = centred / torch.sqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


class SyncBatchNorm1d(SyncBatchNorm, nn.BatchNorm1d):
    """Synced BatchNorm over (N, C) or (N, C, L): the projection heads' pooled features."""


class SyncBatchNorm2d(SyncBatchNorm, nn.BatchNorm2d):
    """Synced BatchNorm over (N, C, H, W): UperNet's maps (mmsegmentation's SyncBN)."""


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
