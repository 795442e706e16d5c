"""ViTDet's backbone attention (Li et al. arXiv 2203.16527, Sec. 3): a plain pre-trained ViT
run on a large detection image with most blocks attending within non-overlapping
``window x window`` token windows and a few blocks (4, evenly spaced) attending globally, which
propagates information across windows. Built on the encoder's own blocks (timm ``Block``), so
the pre-trained weights are used as they are. ViTDet's relative positions
(``use_rel_pos``) are added to the blocks' attention by hpc_mim/models/relpos.py, with
window-sized tables in the windowed blocks (the same ``global_blocks`` must be given to both).

Shapes: tokens (B, L, D) on a (gh, gw) grid, L = gh * gw, without the cls token(s) (ViTDet
drops them). The grid is padded with zeros to a multiple of the window, as ViTDet pads the
normalised tokens inside each windowed block, and the padding is cut off after attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpc_mim.models.adaln import AdaLNBlock


def evenly_spaced(depth: int, count: int = 4) -> list[int]:
    """``count`` global-attention blocks spread over ``depth``: ViT-B (12) -> [2, 5, 8, 11]."""
    return sorted({max(0, (i + 1) * depth // count - 1) for i in range(count)})


def window_partition(x: torch.Tensor, grid: tuple[int, int], window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, L, D) -> (B * nW, window * window, D) and the padded grid (Hp, Wp)."""
    b, _, d = x.shape
    gh, gw = grid
    x = F.pad(x.view(b, gh, gw, d), (0, 0, 0, (-gw) % window, 0, (-gh) % window))
    hp, wp = x.shape[1:3]
    x = x.view(b, hp // window, window, wp // window, window, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, d), (hp, wp)


def window_unpartition(x: torch.Tensor, grid: tuple[int, int], padded: tuple[int, int],
                       window: int) -> torch.Tensor:
    """Inverse of ``window_partition``: (B * nW, window * window, D) -> (B, L, D)."""
    (gh, gw), (hp, wp) = grid, padded
    d = x.shape[-1]
    x = x.view(-1, hp // window, wp // window, window, window, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hp, wp, d)[:, :gh, :gw].reshape(-1, gh * gw, d)


def windowed_block(block: nn.Module, x: torch.Tensor, grid: tuple[int, int], window: int,
                   c: torch.Tensor | None = None) -> torch.Tensor:
    """One block with attention inside windows. A timm ``Block`` runs as ViTDet's: norm,
    windowed attention, residual and stochastic depth per image, MLP on every token. An
    AdaLN block (UMD's encoder) runs whole per window (its norm and MLP are per token anyway;
    the condition repeats per window; stochastic depth then drops per window)."""
    if isinstance(block, AdaLNBlock):
        windows, padded = window_partition(x, grid, window)
        per_window = windows.shape[0] // x.shape[0]
        out = block(windows, c.repeat_interleave(per_window, dim=0))
        return window_unpartition(out, grid, padded, window)
    windows, padded = window_partition(block.norm1(x), grid, window)
    attended = window_unpartition(block.attn(windows), grid, padded, window)
    x = x + block.drop_path1(block.ls1(attended))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def vitdet_features(encoder: nn.Module, images: torch.Tensor, window: int,
                    global_blocks: list[int]) -> torch.Tensor:
    """The last block's map (B, D, gh, gw) of ``encoder`` (a ViTEncoder) on ``images``
    (B, C, H, W), with windowed attention except in ``global_blocks``."""
    grid = encoder.grid_of(images.shape[-2:])
    c = encoder.condition(images, None)
    x = encoder.embed(images)[:, encoder.num_prefix:]                        # (B, L, D)
    for i, block in enumerate(encoder.blocks):
        if i in global_blocks:
            x = block(x) if c is None else block(x, c)
        else:
            x = windowed_block(block, x, grid, window, c)
    return x.transpose(1, 2).reshape(x.shape[0], -1, *grid)
