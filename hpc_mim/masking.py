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
    """Per-sample uniform masking (MAE, arXiv 2111.06377): keeps exactly
    ``K = int(L * (1 - mask_ratio))`` patches per sample."""
    noise = torch.rand(batch, num_patches, device=device, generator=generator)  # (B, L)
    return masking_from_shuffle(torch.argsort(noise, dim=1), int(num_patches * (1 - mask_ratio)))


def masking_from_shuffle(ids_shuffle: torch.Tensor, keep: int) -> Masking:
    """The first ``keep`` patches of each row of ``ids_shuffle`` (B, L) are visible."""
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(ids_shuffle.shape, device=ids_shuffle.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)                                   # back to patch order
    return Masking(ids_shuffle[:, :keep], mask, ids_restore)


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


def hybrid_masking(batch: int, num_patches: int, mask_ratio: float, noise_ratio: float,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint masked and noised token sets from one per-sample shuffle (noised_mim).

    Returns ``masked`` and ``noised``, both (B, L) bool: ``int(L * mask_ratio)`` and
    ``int(L * noise_ratio)`` True per sample, never both; the remaining tokens stay clean.
    """
    n_mask, n_noise = int(num_patches * mask_ratio), int(num_patches * noise_ratio)
    rank = torch.argsort(torch.argsort(torch.rand(batch, num_patches, device=device), dim=1), dim=1)
    return rank < n_mask, (rank >= n_mask) & (rank < n_mask + n_noise)      # (B, L) each


def noncontiguous_grid(imgs: torch.Tensor, grid: int, patch_size: int, gap: int) -> torch.Tensor:
    """LatentMIM's non-contiguous grid (arXiv 2407.15837, Sec. 3.5).

    ``imgs`` (B, C, S, S) with S = grid * (patch_size + gap) are cut into grid x grid cells of
    ``patch_size + gap`` pixels; each row of cells gets a random vertical offset and each
    column a random horizontal offset in [0, gap), per sample, and the p x p patch at that offset
    is kept. Neighbouring patches are thus separated by 1 to 2*gap-1 pixels (none when gap = 0).
    Returns the patches packed edge to edge, (B, C, grid*p, grid*p), ready for a ViT of image
    size grid*p whose patch (i, j) is cell (i, j).
    """
    b, c, s, _ = imgs.shape
    p, cell = patch_size, patch_size + gap
    if s != grid * cell:
        raise ValueError(f"non-contiguous grid needs {grid * cell} px images, got {s}")
    offsets = torch.randint(0, max(gap, 1), (2, b, grid), device=imgs.device)  # (rows|cols, B, g)
    base = torch.arange(grid, device=imgs.device) * cell                      # (g,)
    within = torch.arange(p, device=imgs.device)                              # (p,)
    # pixel index of every output row / column: (B, g*p)
    idx = ((base + offsets)[..., None] + within).reshape(2, b, grid * p)
    rows, cols = idx[0], idx[1]
    batch = torch.arange(b, device=imgs.device)[:, None, None]
    out = imgs.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, g*p, g*p, C)
    return out.permute(0, 3, 1, 2).contiguous()
