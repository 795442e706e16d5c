"""Timestep conditioning by adaptive LayerNorm (DiT, Peebles & Xie, arXiv 2212.09748), used by
UMD (arXiv 2406.17688) in its encoder and decoder.

timm has no timestep embedder or adaLN block, so these two are written here; the attention and
MLP inside the block are timm's.
"""
from __future__ import annotations

import math

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn


class TimestepEmbedder(nn.Module):
    """Integer timesteps (B,) -> (B, dim): sinusoidal features of width ``freq_dim``, then an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]                              # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)          # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) with per-sample shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated by a condition ``c`` (B, D):
    shift, scale and a residual gate for attention and MLP (adaLN-Zero: the modulation starts
    at zero, so every block starts as the identity)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def zero_modulation(self) -> None:
        """adaLN-Zero init; call after any global weight init."""
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """Apply plain timm blocks (c is None) or AdaLN blocks conditioned on c."""
    for block in blocks:
        x = block(x) if c is None else block(x, c)
    return x
