"""Extra augmented views, applied to whole batches on the training device.

A method that needs a second view of each image names a recipe here in ``extra_views``; the
loader decodes the same sample again with its own random crop + flip (uint8), and the recipe
turns that into a normalised float view. Done in torch rather than in FFCV because FFCV 1.0
has no hue, grayscale, solarize or blur op, and per-sample parameters are cheap on a batch.
Also here, on the same terms: the normalisation of the main image of a GPU loader
(``normalize_uint8``) and fine-tuning's RandAugment (``rand_augment``: timm's policy, MAE's
``rand-m9-mstd0.5-inc1``, or torchvision's as an option).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from hpc_mim.data.augment_policy import TimmRandAugment, TorchvisionRandAugment, parse_auto_augment
from hpc_mim.data.randaugment import rand_augment_uint8
from hpc_mim.data.randaugment_timm import fill_for, rand_augment_timm


def _per_sample(b: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return torch.empty(b, 1, 1, 1, device=device).uniform_(lo, hi)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(x, num_output_channels=3)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each image of x (B, 3, H, W) in [0, 1] by its own ``shift`` (B,),
    in turns (torchvision's ``adjust_hue`` factor, [-0.5, 0.5]). Batched on the device:
    torchvision's takes one Python float per call, so per-image factors meant a Python loop and
    a host round trip per image. (kornia's ``adjust_hue`` takes a tensor of factors, but would
    be a new dependency for this and the blur below; both are checked against torchvision.)"""
    v, _ = x.max(dim=1)                                                      # (B, H, W)
    chroma = v - x.min(dim=1).values
    sat = torch.where(v > 0, chroma / v.clamp(min=1e-12), torch.zeros_like(v))
    r, g, b = x.unbind(dim=1)
    safe = chroma.clamp(min=1e-12)
    # hue in sixths of a turn, by which channel is the maximum (red wins ties, then green)
    hue = torch.where(v == r, ((g - b) / safe) % 6,
                      torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = (hue + 6 * shift.view(-1, 1, 1)) % 6                               # rotated, in [0, 6)
    # back to RGB: channel n (R=5, G=3, B=1) = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6
    n = (5 - 2 * torch.arange(3, device=x.device, dtype=x.dtype)).view(1, 3, 1, 1)  # no H2D copy
    k = (n + hue.unsqueeze(1)) % 6
    return v.unsqueeze(1) * (1 - sat.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each image of x (B, C, H, W) with its own ``sigma`` (B,), a ``kernel``
    px square window, reflect padding (torchvision's ``gaussian_blur`` per image, batched as
    one grouped separable convolution)."""
    b, c, h, w = x.shape
    offsets = torch.arange(kernel, device=x.device, dtype=x.dtype) - (kernel - 1) / 2
    k1d = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)               # (B, k)
    k1d = (k1d / k1d.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)   # (B*C, k)
    pad = kernel // 2
    y = F.pad(x.reshape(1, b * c, h, w), [pad, pad, pad, pad], mode="reflect")
    y = F.conv2d(y, k1d.view(b * c, 1, 1, kernel), groups=b * c)             # along W
    y = F.conv2d(y, k1d.view(b * c, 1, kernel, 1), groups=b * c)             # along H
    return y.view(b, c, h, w)


def color_jitter(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter(0.4, 0.4, 0.2, 0.1) on each image of x (B, 3, H, W) in [0, 1]:
    every image draws its four factors and its own order of the four ops (torchvision permutes
    them per call). Batched: in each of 4 rounds every op runs on the whole batch and each
    image keeps the one its order names -- 16 cheap elementwise passes, no per-image loop."""
    b, dev = x.shape[0], x.device
    bright, contrast, sat = (_per_sample(b, 1 - a, 1 + a, dev) for a in (0.4, 0.4, 0.2))
    hue = torch.empty(b, device=dev).uniform_(-0.1, 0.1)

    def contrast_op(y: torch.Tensor) -> torch.Tensor:
        mean = _grayscale(y).mean(dim=(1, 2, 3), keepdim=True)
        return (mean + (y - mean) * contrast).clamp(0, 1)

    ops = (lambda y: (y * bright).clamp(0, 1), contrast_op,
           lambda y: (_grayscale(y) + (y - _grayscale(y)) * sat).clamp(0, 1),
           lambda y: shift_hue(y, hue))
    order = torch.argsort(torch.rand(b, 4, device=dev), dim=1)               # (B, 4) a permutation each
    for r in range(4):
        which = order[:, r].view(b, 1, 1, 1)
        x = sum(torch.where(which == k, op(x), 0.0) for k, op in enumerate(ops))
    return x


def strong_color(x: torch.Tensor) -> torch.Tensor:
    """LUT's view 2 (arXiv 2310.13593; naver-ai/lut main_lut.py) on images in [0, 1], (B, 3,
    H, W): with p = 0.8 ``color_jitter`` (brightness 0.4, contrast 0.4, saturation 0.2, hue
    0.1, in a random order), then exactly one of grayscale, solarize (threshold 0.5: PIL's 128)
    or Gaussian blur (sigma U(0.1, 2), kernel ~10% of the side), each sample drawing its own
    parameters. Whole-batch tensor ops only: no host sync, no per-sample Python loop."""
    b, dev = x.shape[0], x.device
    jitter = (torch.rand(b, 1, 1, 1, device=dev) < 0.8).to(x)
    x = jitter * color_jitter(x) + (1 - jitter) * x

    choice = torch.randint(0, 3, (b,), device=dev).view(b, 1, 1, 1)
    kernel = max(3, int(0.1 * x.shape[-1]) // 2 * 2 + 1)
    blurred = gaussian_blur(x, kernel, torch.empty(b, device=dev).uniform_(0.1, 2.0))
    x = torch.where(choice == 0, _grayscale(x), x)
    x = torch.where(choice == 1, TF.solarize(x, 0.5), x)
    return torch.where(choice == 2, blurred, x)


RECIPES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"strong_color": strong_color}


def check_views(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise KeyError(f"unknown view recipe(s) {unknown}; hpc_mim/data/views.py has {sorted(RECIPES)}")


@functools.lru_cache(maxsize=64)
def _device_stats(mean: tuple[float, ...], std: tuple[float, ...], scale: float,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # computed in float64, rounded once to float32, copied once per (stats, device) without
    # waiting for the device; made outside inference mode so that any later caller can use them
    with torch.inference_mode(False):
        pair = (torch.tensor([mean, std], dtype=torch.float64) * scale).float().view(2, 1, -1, 1, 1)
        m, s = pair.to(device, non_blocking=True)
    return m, s


def _stats(mean: Sequence[float], std: Sequence[float], device: torch.device,
           scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1) float32 ``scale * mean`` and ``scale * std`` on ``device``, made once per
    device and process: a ``torch.tensor(..., device=cuda)`` per batch would be a blocking copy
    that drains the GPU's queue."""
    return _device_stats(tuple(map(float, mean)), tuple(map(float, std)), float(scale), torch.device(device))


def normalize_uint8(raw: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(raw - 255 mean) / (255 std)`` on raw's device, in its
    memory format (channels-last as FFCV's ToTorchImage gives it stays channels-last). What
    FFCV's NormalizeImage computes (a float64 table rounded to float32), to float32 rounding,
    without its GPU path, which needs cupy (hpc_mim/data/ffcv_io.py)."""
    m, s = _stats(mean, std, raw.device, scale=255.0)
    return raw.float().sub_(m).div_(s)             # in place: one float32 buffer, layout kept


def finish_view(name: str, raw: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) crop from the loader -> recipe -> normalised float view."""
    x = RECIPES[name](raw.float() / 255)
    m, s = _stats(mean, std, x.device)
    return (x - m) / s


def rand_augment(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 policy: str = "rand-m9-mstd0.5-inc1") -> torch.Tensor:
    """Fine-tuning's RandAugment on a normalised batch x (B, C, H, W), each image drawing its own
    ops, coins, magnitudes and signs; returns it normalised, float32, in x's memory format.
    ``policy`` (hpc_mim/data/augment_policy.py): timm's ``rand-...`` string (MAE's
    ``rand-m9-mstd0.5-inc1`` by default: hpc_mim/data/randaugment_timm.py, PIL's ops, fill =
    the dataset mean as timm's), ``tv-rand-n<N>-m<M>`` for torchvision's RandAugment(N, M)
    (hpc_mim/data/randaugment.py), or "" for none. The images go through uint8 (RandAugment's
    arithmetic) and the ops run batched on x's device: no per-image loop, no host sync."""
    spec = _policy(policy)
    if spec is None:
        return x
    m, s = _stats(mean, std, x.device)
    raw = ((x * s + m) * 255).round().clamp(0, 255).to(torch.uint8)
    if isinstance(spec, TimmRandAugment):
        out = rand_augment_timm(raw, spec, fill_for(tuple(map(float, mean)), x.device))
    else:
        out = rand_augment_uint8(raw, num_ops=spec.num_ops, magnitude=spec.magnitude)
    if x.is_contiguous(memory_format=torch.channels_last):     # the patch embedding's layout
        out = out.contiguous(memory_format=torch.channels_last)
    return (out.float() / 255 - m) / s


@functools.lru_cache(maxsize=None)
def _policy(policy: str) -> TimmRandAugment | TorchvisionRandAugment | None:
    return parse_auto_augment(policy)
