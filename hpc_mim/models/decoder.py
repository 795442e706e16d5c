"""MAE's lightweight transformer decoder (arXiv 2111.06377, Sec. 3 "MAE decoder"), optionally
timestep-conditioned by AdaLN (UMD, arXiv 2406.17688)."""
from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from hpc_mim.models.adaln import AdaLNBlock, TimestepEmbedder, modulate, run_blocks
from hpc_mim.models.vit import init_mae_weights, sincos_pos_embed


class MAEDecoder(nn.Module):
    """Visible tokens + mask tokens, unshuffled into place, through ``depth`` blocks.

    Shapes: encoder tokens (B, P+K, D_enc), ids_restore (B, L) [, timesteps (B,)] ->
    predictions (B, L, out_dim) for every patch (the P cls tokens are dropped).
    ``forward`` = ``prepare`` -> ``blocks`` -> ``head``; a method that needs each block's input
    (noised_mim's attention loss) runs the three itself.
    """

    def __init__(self, grid: tuple[int, int], encoder_dim: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, out_dim: int = 768, mlp_ratio: float = 4.0,
                 num_prefix: int = 1, timestep_cond: bool = False, input_proj: bool = True,
                 learned_pos: bool = False) -> None:
        super().__init__()
        self.num_prefix = num_prefix
        # input_proj=False (UMD at the encoder's width, as its authors): tokens go in unprojected
        if not input_proj and encoder_dim != dim:
            raise ValueError(f"decoder without input projection needs dim == encoder_dim, got {dim} vs {encoder_dim}")
        self.embed = nn.Linear(encoder_dim, dim) if input_proj else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid, dim, num_prefix), persistent=False)
        self.pos_embed_learned = None
        if learned_pos:          # UMD's authors: learned, normal(1/sqrt(L)); the prefix gets none
            num = grid[0] * grid[1]
            self.pos_embed_learned = nn.Parameter(torch.randn(1, num, dim) / num ** 0.5)
        norm = partial(nn.LayerNorm, eps=1e-6)
        if timestep_cond:
            self.t_embed = TimestepEmbedder(dim)
            self.blocks = nn.ModuleList(AdaLNBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        else:
            self.t_embed = None
            self.blocks = nn.ModuleList(
                Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.norm = norm(dim)
        # timestep-conditioned: the normalised output is shift/scale-modulated by t before the
        # prediction (UMD's authors' final_modulation; DiT's final layer), zero-init: identity
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)) if timestep_cond else None
        self.pred = nn.Linear(dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_mae_weights)
        for block in self.blocks:
            if isinstance(block, AdaLNBlock):
                block.zero_modulation()
        if self.final_modulation is not None:
            nn.init.zeros_(self.final_modulation[1].weight)
            nn.init.zeros_(self.final_modulation[1].bias)

    def prepare(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Embed, append mask tokens, unshuffle, add positions: (B, P+L, d)."""
        x = self.embed(tokens)                                               # (B, P+K, d)
        p = self.num_prefix
        b, num_patches = ids_restore.shape
        masks = self.mask_token.expand(b, num_patches + p - x.shape[1], -1)  # (B, L-K, d)
        patches = torch.cat([x[:, p:], masks], dim=1)                        # shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if self.pos_embed_learned is not None:
            return torch.cat([x[:, :p], patches + self.pos_embed_learned], dim=1)
        return torch.cat([x[:, :p], patches], dim=1) + self.pos_embed        # (B, P+L, d)

    def head(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(x)
        if self.final_modulation is not None and c is not None:
            shift, scale = self.final_modulation(c).chunk(2, dim=-1)         # (B, d) each
            x = modulate(x, shift, scale)
        return self.pred(x)[:, self.num_prefix:]                             # (B, L, out_dim)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor,
                t: torch.Tensor | None = None) -> torch.Tensor:
        c = None
        if self.t_embed is not None:
            t = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device) if t is None else t
            c = self.t_embed(t)
        return self.head(run_blocks(self.blocks, self.prepare(tokens, ids_restore), c), c)
