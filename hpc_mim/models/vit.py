"""ViT encoder on timm blocks with fixed 2D sin-cos position embeddings and a cls token.

Follows the MAE encoder (arXiv 2111.06377; facebookresearch/mae:models_mae.py): pre-norm timm
``Block``s, LayerNorm eps 1e-6, xavier-uniform linear init, the cls token's position embedding
is zero. ``forward(x, ids_keep)`` runs on a subset of patches (masked pre-training);
``forward_intermediates`` returns spatial feature maps of chosen blocks (dense evaluations).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from hpc_mim.masking import gather_tokens


def sincos_pos_embed(grid: tuple[int, int], dim: int, cls_token: bool = True) -> torch.Tensor:
    """(1, [1+] gh*gw, dim) fixed sin-cos embedding; the cls slot is zeros, as in MAE."""
    pos = build_sincos2d_pos_embed(list(grid), dim=dim)                     # (gh*gw, dim)
    if cls_token:
        pos = torch.cat([torch.zeros(1, dim), pos], dim=0)
    return pos.unsqueeze(0)


def init_mae_weights(module: nn.Module) -> None:
    """MAE init: xavier-uniform Linear weights, zero bias, LayerNorm weight 1 / bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTEncoder(nn.Module):
    """Vision Transformer encoder.

    Shapes: images (B, C, H, W) -> tokens (B, 1 + K, D), where K = L = (H/p)*(W/p) without
    masking, or K = ids_keep.shape[1] with it. Token 0 is the cls token.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid = self.patch_embed.grid_size                               # (gh, gw)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A buffer, not a parameter: the embedding is fixed, and rebuilding it from the config
        # keeps exported weights independent of the image size.
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, embed_dim), persistent=False)
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm, drop_path=r)
            for r in rates)
        self.norm = norm(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))   # treat the conv as a linear layer
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_mae_weights)

    def embed(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch + position embedding, optional patch subset, cls prepended: (B, 1+K, D)."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]                      # (B, L, D)
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)                                   # (B, K, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) [+ ids_keep (B, K)] -> normalised tokens (B, 1+K, D)."""
        x = self.embed(x, ids_keep)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pooled(self, x: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
        """Global representation (B, D): the cls token or the mean of the patch tokens."""
        tokens = self.forward(x)
        return tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(dim=1)

    def forward_intermediates(self, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Feature maps (B, D, gh, gw) after each block in ``indices`` (0-based)."""
        out = []
        tokens = self.embed(x)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in indices:
                patches = tokens[:, 1:]                                      # (B, L, D)
                out.append(patches.transpose(1, 2).reshape(x.shape[0], -1, *self.grid))
        return out


def build_encoder(model_cfg: dict[str, Any]) -> ViTEncoder:
    """Encoder from the ``model`` section of a config (a dict or ModelConfig)."""
    if not isinstance(model_cfg, dict):
        model_cfg = vars(model_cfg)
    return ViTEncoder(**model_cfg)


def save_encoder(encoder: nn.Module, model_cfg: dict[str, Any], path: Path,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``{"model": cfg, "state_dict": fp32 weights}`` atomically (tmp + rename)."""
    sd = state_dict if state_dict is not None else encoder.state_dict()
    sd = {k: v.detach().float().cpu() for k, v in sd.items()}
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": dict(model_cfg), "state_dict": sd}, tmp)
    tmp.replace(path)


def load_encoder(path: Path, map_location: str = "cpu") -> ViTEncoder:
    """Rebuild an encoder exported by ``save_encoder``; the weights must match exactly."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    encoder = build_encoder(blob["model"])
    encoder.load_state_dict(blob["state_dict"], strict=True)
    return encoder
