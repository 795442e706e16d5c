"""A plain-PyTorch MAE training step, written the way a researcher would by hand: timm ViT
blocks, per-sample random masking, a narrow decoder, the normalised-pixel MSE on masked patches,
torch's AdamW. No hpc_mim import: it is the reference the pipeline's loop is measured against
(benchmarks/bench.py). MAE: He et al., arXiv 2111.06377.

    python benchmarks/plain_mae.py --steps 20        # img/s of the demo ViT (fmnist_tiny shapes)
"""
from __future__ import annotations

import argparse
import time

import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn


class PlainMAE(nn.Module):
    """Encoder on the visible patches (+ cls), decoder on all patches; images (B, C, S, S)."""

    def __init__(self, img_size: int = 28, patch: int = 4, chans: int = 3, dim: int = 128,
                 depth: int = 6, heads: int = 4, dec_dim: int = 64, dec_depth: int = 2,
                 dec_heads: int = 4, mask_ratio: float = 0.75) -> None:
        super().__init__()
        self.patch, self.mask_ratio = patch, mask_ratio
        self.patch_embed = PatchEmbed(img_size, patch, chans, dim)
        grid = self.patch_embed.grid_size
        self.num_patches = grid[0] * grid[1]
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        pe = build_sincos2d_pos_embed(list(grid), dim=dim)
        self.register_buffer("pos", torch.cat([torch.zeros(1, dim), pe])[None])
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.dec_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        dpe = build_sincos2d_pos_embed(list(grid), dim=dec_dim)
        self.register_buffer("dec_pos", torch.cat([torch.zeros(1, dec_dim), dpe])[None])
        self.dec_blocks = nn.ModuleList(Block(dec_dim, dec_heads, 4.0, qkv_bias=True)
                                        for _ in range(dec_depth))
        self.dec_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.pred = nn.Linear(dec_dim, patch * patch * chans)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        b, length = imgs.shape[0], self.num_patches
        x = self.patch_embed(imgs) + self.pos[:, 1:]                          # (B, L, D)
        keep = int(length * (1 - self.mask_ratio))
        shuffle = torch.argsort(torch.rand(b, length, device=imgs.device), dim=1)
        restore = torch.argsort(shuffle, dim=1)
        ids = shuffle[:, :keep]
        x = torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([(self.cls + self.pos[:, :1]).expand(b, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.dec_embed(self.norm(x))                                      # (B, 1+K, d)
        y = torch.cat([x[:, 1:], self.mask_token.expand(b, length - keep, -1)], dim=1)
        y = torch.gather(y, 1, restore[..., None].expand(-1, -1, y.shape[-1]))
        y = torch.cat([x[:, :1], y], dim=1) + self.dec_pos
        for blk in self.dec_blocks:
            y = blk(y)
        pred = self.pred(self.dec_norm(y))[:, 1:]                             # (B, L, p*p*C)
        p, c, h = self.patch, imgs.shape[1], imgs.shape[2] // self.patch
        target = imgs.reshape(b, c, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * h, -1)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        mask = torch.ones(b, length, device=imgs.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def make(batch: int, seed: int = 0) -> tuple[PlainMAE, torch.optim.Optimizer, torch.Tensor]:
    """The model, torch's default AdamW (MAE's betas and weight decay) and a fixed batch."""
    torch.manual_seed(seed)
    model = PlainMAE()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    return model, opt, torch.randn(batch, 3, 28, 28)


def step(model: PlainMAE, opt: torch.optim.Optimizer, images: torch.Tensor) -> torch.Tensor:
    loss = model(images)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, opt, images = make(args.batch)
    for _ in range(3):                                      # warm up allocators and kernels
        step(model, opt, images)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step(model, opt, images)
    print(f"plain MAE: {args.batch * args.steps / (time.perf_counter() - start):.0f} img/s "
          f"(batch {args.batch}, {args.threads} threads, final loss {loss.item():.4f})")


if __name__ == "__main__":
    main()
