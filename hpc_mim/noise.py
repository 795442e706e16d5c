"""Diffusion noise schedules shared by noised_mim and umd."""
from __future__ import annotations

import math

import torch


def cosine_alphas_cumprod(steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """alpha_bar(t) for t = 0..steps-1 of the cosine schedule (Nichol & Dhariwal, arXiv
    2102.09672): ``f(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2``, betas ``1 - f(t+1)/f(t)`` clipped
    at ``max_beta``, ``alpha_bar = cumprod(1 - beta)``. Float64, shape (steps,)."""
    f = lambda t: math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f(t + 1) / f(t), max_beta) for t in range(steps)],
                         dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def add_noise(x0: torch.Tensor, alpha_bar: torch.Tensor,
              eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` with a per-sample ``alpha_bar`` (B,).
    Returns (x_t, eps); x0 of any shape (B, ...)."""
    eps = torch.randn_like(x0) if eps is None else eps
    a = alpha_bar.float().reshape(-1, *([1] * (x0.dim() - 1)))       # coefficients in fp32
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * eps.float()).to(x0.dtype), eps
