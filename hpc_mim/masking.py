"""Token masking and patch (un)folding shared by the MIM methods.

Conventions (as in facebookresearch/mae:models_mae.py): ``mask`` is (B, L) with 1 = hidden,
``ids_keep`` (B, K) indexes the visible patches, ``ids_restore`` (B, L) undoes the shuffle.
Also LatentMIM's non-contiguous grid (one random offset per cell, as the authors' ``Patchify``)
and noised_mim's disjoint masked / noised token sets.
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
    """LatentMIM's non-contiguous grid (arXiv 2407.15837, Sec. 3.5), as the authors' ``Patchify``
    (yibingwei-1/LatentMIM:vits.py, ``Patchify.patchify``).

    ``imgs`` (B, C, S, S) with S = grid * (patch_size + gap) are cut into grid x grid cells of
    ``patch_size + gap`` pixels; every cell of every sample draws its own vertical offset dy and
    horizontal offset dx in [0, gap) (two draws of shape (B, g, g), dy first, as the authors'),
    and the p x p patch at (dy, dx) inside the cell is kept. Neighbouring patches are thus
    separated by 1 to 2*gap-1 pixels, and a row of patches is not aligned (none of this when
    gap = 0: then nothing is drawn). Returns the patches packed edge to edge, (B, C, g*p, g*p),
    ready for a ViT of image size g*p whose patch (i, j) is cell (i, j).
    """
    b, c, s, _ = imgs.shape
    p, cell = patch_size, patch_size + gap
    if s != grid * cell:
        raise ValueError(f"non-contiguous grid needs {grid * cell} px images, got {s}")
    if gap == 0:
        return imgs
    cells = imgs.reshape(b, c, grid, cell, grid, cell)                          # (B, C, gi, y, gj, x)
    within = torch.arange(p, device=imgs.device)                                  # (p,)
    dy = torch.randint(0, gap, (b, grid, grid), device=imgs.device)              # per (sample, i, j)
    dx = torch.randint(0, gap, (b, grid, grid), device=imgs.device)
    rows = (dy[..., None] + within).permute(0, 1, 3, 2)                           # (B, gi, p, gj)
    cols = (dx[..., None] + within)                                               # (B, gi, gj, p)
    # pick rows inside each cell: index (B, C, gi, p, gj, cell)
    out = torch.gather(cells, 3, rows[:, None, :, :, :, None].expand(b, c, grid, p, grid, cell))
    # then columns: index (B, C, gi, p, gj, p)
    out = torch.gather(out, 5, cols[:, None, :, None, :, :].expand(b, c, grid, p, grid, p))
    return out.reshape(b, c, grid * p, grid * p)
