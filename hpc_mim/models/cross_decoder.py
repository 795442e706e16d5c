"""LatentMIM's cross-attention decoder with visual cues (arXiv 2407.15837, Sec. 3.6;
yibingwei-1/LatentMIM).

Queries are [cls; one token per target patch], as the authors' ``CrossDecoder``
(yibingwei-1/LatentMIM:xvits.py): the cls query is the decoder's own learned token (init normal,
std 0.02; its position embedding is zero), not the encoder's cls token, which stays among the
keys with the visible tokens. A target query starts as a learned mask token (init zero, as the
authors') plus its position embedding plus a "visual cue": the visible tokens averaged with
weights ``softmax(pe_q pe_k^T / sqrt(d))``, i.e. by how close their positions are. Each block
lets the queries attend to each other, then to the visible tokens, then applies an MLP. Because
the queries never become keys for the visible tokens, the decoder cannot leak target content.
Attention layers are torch's ``nn.MultiheadAttention``; the MLP is timm's.
"""
from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn

from hpc_mim.masking import gather_tokens
from hpc_mim.models.vit import init_mae_weights, sincos_pos_embed


class CrossAttentionBlock(nn.Module):
    """q += SelfAttn(LN q); q += CrossAttn(LN q, LN kv); q += MLP(LN q)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm_q1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_q2 = nn.LayerNorm(dim, eps=1e-6)
        self.norm_kv = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        h = self.norm_q1(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        kv = self.norm_kv(kv)
        q = q + self.cross_attn(self.norm_q2(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class CrossAttentionDecoder(nn.Module):
    """(B, 1+K, D_enc) visible tokens at ``ids_keep`` (B, K) -> (B, T, out_dim) predictions for
    the patches at ``ids_target`` (B, T)."""

    def __init__(self, grid: tuple[int, int], encoder_dim: int, dim: int = 512, depth: int = 3,
                 num_heads: int = 16, out_dim: int = 768) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))             # zero at init
        self.register_buffer("pos_embed", sincos_pos_embed(grid, dim), persistent=False)
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_mae_weights)

    def forward(self, visible: torch.Tensor, ids_keep: torch.Tensor,
                ids_target: torch.Tensor) -> torch.Tensor:
        v = self.embed(visible)                                              # (B, 1+K, d)
        b, d = v.shape[0], v.shape[-1]
        pos = self.pos_embed[:, 1:].expand(b, -1, -1)                        # (B, L, d)
        pe_k, pe_q = gather_tokens(pos, ids_keep), gather_tokens(pos, ids_target)
        cue = torch.softmax(pe_q @ pe_k.transpose(1, 2) / d ** 0.5, dim=-1) @ v[:, 1:]  # (B, T, d)
        cls = self.cls_token.expand(b, -1, -1)                               # (B, 1, d)
        queries = torch.cat([cls, self.mask_token + cue + pe_q], dim=1)     # (B, 1+T, d)
        kv = v + torch.cat([self.pos_embed[:, :1].expand(b, -1, -1), pe_k], dim=1)
        for block in self.blocks:
            queries = block(queries, kv)
        return self.pred(self.norm(queries))[:, 1:]                          # (B, T, out_dim)
