"""MAE's lightweight transformer decoder (arXiv 2111.06377, Sec. 3 "MAE decoder")."""
from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from hpc_mim.models.vit import init_mae_weights, sincos_pos_embed


class MAEDecoder(nn.Module):
    """Visible tokens + mask tokens, unshuffled into place, through ``depth`` blocks.

    Shapes: encoder tokens (B, 1+K, D_enc), ids_restore (B, L) -> predictions (B, L, out_dim)
    for every patch (the cls token is dropped).
    """

    def __init__(self, grid: tuple[int, int], encoder_dim: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, out_dim: int = 768, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid, dim), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_mae_weights)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)                                               # (B, 1+K, d)
        b, num_patches = ids_restore.shape
        masks = self.mask_token.expand(b, num_patches + 1 - x.shape[1], -1)  # (B, L-K, d)
        patches = torch.cat([x[:, 1:], masks], dim=1)                        # shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed           # (B, 1+L, d)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]                                # (B, L, out_dim)
