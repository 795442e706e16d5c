"""Extra augmented views, applied to whole batches on the training device.

A method that needs a second view of each image names a recipe here in ``extra_views``; the
loader decodes the same sample again with its own random crop + flip (uint8), and the recipe
turns that into a normalised float view. Done in torch rather than in FFCV because FFCV 1.0
has no hue, grayscale, solarize or blur op, and per-sample parameters are cheap on a batch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


def _per_sample(b: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return torch.empty(b, 1, 1, 1, device=device).uniform_(lo, hi)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(x, num_output_channels=3)


def strong_color(x: torch.Tensor) -> torch.Tensor:
    """LUT's view 2 (arXiv 2310.13593) on images in [0, 1], (B, 3, H, W): with p = 0.8 colour
    jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in that order), then exactly
    one of grayscale, solarize (threshold 0.5) or Gaussian blur (sigma U(0.1, 2), kernel ~10%
    of the side), each sample drawing its own parameters."""
    b, dev = x.shape[0], x.device
    jitter = (torch.rand(b, 1, 1, 1, device=dev) < 0.8).to(x)
    y = x * _per_sample(b, 0.6, 1.4, dev)                                    # brightness
    mean = _grayscale(y).mean(dim=(1, 2, 3), keepdim=True)
    y = (mean + (y - mean) * _per_sample(b, 0.6, 1.4, dev)).clamp(0, 1)      # contrast
    y = (_grayscale(y) + (y - _grayscale(y)) * _per_sample(b, 0.8, 1.2, dev)).clamp(0, 1)
    hues = torch.empty(b).uniform_(-0.1, 0.1).tolist()
    y = torch.stack([TF.adjust_hue(img, h) for img, h in zip(y, hues)])     # hue: per sample
    x = jitter * y + (1 - jitter) * x

    choice = torch.randint(0, 3, (b,), device=dev).view(b, 1, 1, 1)
    x = torch.where(choice == 0, _grayscale(x), x)
    x = torch.where(choice == 1, TF.solarize(x, 0.5), x)
    blur = (choice.view(-1) == 2).nonzero().view(-1).tolist()
    if blur:
        k = max(3, int(0.1 * x.shape[-1]) // 2 * 2 + 1)
        x = x.clone()
        for i in blur:
            x[i] = TF.gaussian_blur(x[i], [k, k], [float(torch.empty(()).uniform_(0.1, 2.0))])
    return x


RECIPES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"strong_color": strong_color}


def check_views(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise KeyError(f"unknown view recipe(s) {unknown}; hpc_mim/data/views.py has {sorted(RECIPES)}")


def finish_view(name: str, raw: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) crop from the loader -> recipe -> normalised float view."""
    x = RECIPES[name](raw.float() / 255)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def rand_augment(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], num_ops: int = 2,
                 magnitude: int = 9) -> torch.Tensor:
    """RandAugment (Cubuk et al. arXiv 1909.13719; torchvision's, which works on tensors) on a
    normalised batch (B, C, H, W), each image drawing its own ops; returns it normalised."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    raw = ((x * s + m) * 255).round().clamp(0, 255).to(torch.uint8)
    augment = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    out = torch.stack([augment(img) for img in raw])        # batched input would share one draw
    return (out.float() / 255 - m) / s
