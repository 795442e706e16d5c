"""Token masking and patch (un)folding shared by the MIM methods.

Conventions (as in facebookresearch/mae:models_mae.py): ``mask`` is (B, L) with 1 = hidden,
``ids_keep`` (B, K) indexes the visible patches, ``ids_restore`` (B, L) undoes the shuffle.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Masking:
    ids_keep: torch.Tensor      # (B, K) indices of visible patches, in shuffled order
    mask: torch.Tensor          # (B, L) float, 1 = hidden, 0 = visible (original order)
    ids_restore: torch.Tensor   # (B, L) position of each original patch in the shuffled order


def random_masking(batch: int, num_patches: int, mask_ratio: float, device: torch.device,
                   generator: torch.Generator | None = None) -> Masking:
    """Per-sample uniform masking of ``int(L * mask_ratio)`` patches (MAE, arXiv 2111.06377).

    Keeps exactly ``K = int(L * (1 - mask_ratio))`` patches per sample.
    """
    keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)  # (B, L)
    ids_shuffle = torch.argsort(noise, dim=1)                                   # ascending: keep small
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]                                            # (B, K)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)                                   # back to patch order
    return Masking(ids_keep, mask, ids_restore)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens: x (B, L, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, pixels as (p, q, c)."""
    b, c, h, w = imgs.shape
    p = patch_size
    gh, gw = h // p, w // p
    x = imgs.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); inverse of ``patchify``."""
    b = x.shape[0]
    p = patch_size
    gh, gw = grid
    x = x.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)
