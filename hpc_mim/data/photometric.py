"""mmsegmentation's ``PhotoMetricDistortion``, the colour augmentation of its ADE20K pipeline
(open-mmlab/mmsegmentation: mmseg/datasets/pipelines/transforms.py, the same in
mmseg/datasets/transforms/transforms.py; configs/_base_/datasets/ade20k.py), which the BEiT / MAE
UperNet runs train with (MAE arXiv 2111.06377 App. A.4 follows BEiT's segmentation code).

On a uint8 image (3, H, W), before normalisation, each step with probability 0.5:

1. brightness: + U(-32, 32)
2. contrast x U(0.5, 1.5) here, if the coin (p 0.5) says "contrast first"
3. saturation: S x U(0.5, 1.5) in OpenCV's 8-bit HSV
4. hue: H + randint(-18, 18) (numpy's exclusive upper bound: -18..17) modulo 180
5. contrast x U(0.5, 1.5) here otherwise

Every step leaves uint8 values as mmseg's ``convert`` does (clip to [0, 255], then truncate),
and the HSV round trips are OpenCV's 8-bit ``cvtColor`` (``mmcv.bgr2hsv`` / ``hsv2bgr``):
the fixed-point RGB2HSV_b (H in [0, 180), rounded with 12-bit tables) and the fp32 HSV2RGB_b
of its vector path (results truncated to uint8; ``1 - s * x`` fused into one multiply-add as
x86-64 / arm64 builds compile it), transcribed here in torch so the images need neither mmcv
nor cv2; equal to cv2 5.1's output on every colour (tests/test_seg_transforms.py; checked
exhaustively over all 2^24 RGB and 180 x 2^16 HSV values when written). The HSV conversion is
channel-order aware, so applying it to RGB images is the same as mmseg's on BGR.

The draws come from torch's global generator (``draw``), which ``SeededSamples``
(hpc_mim/data/dense.py) seeds per (seed, epoch, sample): a resumed job distorts every sample as
an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

HSV_SHIFT = 12                   # OpenCV's fixed point for the 8-bit RGB -> HSV conversion
HUE_RANGE = 180                  # 8-bit hue: degrees / 2


@dataclass(frozen=True)
class PhotometricDraw:
    """One sample's distortion; ``None`` = that step is skipped (its coin came up 0)."""
    brightness: float | None     # beta added to every channel
    contrast_first: bool         # contrast before the HSV steps (mmseg's mode 1) or after
    contrast: float | None       # alpha multiplying every channel
    saturation: float | None     # alpha multiplying S
    hue: int | None              # added to H, modulo 180


def _coin() -> bool:
    return bool(torch.randint(2, ()).item())


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), dtype=torch.float64).item()


def draw(brightness_delta: float = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
         saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> PhotometricDraw:
    """mmseg's random choices (defaults = its PhotoMetricDistortion's), from torch's global
    generator."""
    brightness = _uniform(-brightness_delta, brightness_delta) if _coin() else None
    contrast_first = _coin()
    contrast = _uniform(*contrast_range) if _coin() else None
    saturation = _uniform(*saturation_range) if _coin() else None
    hue = int(torch.randint(-hue_delta, hue_delta, ()).item()) if _coin() else None
    return PhotometricDraw(brightness, contrast_first, contrast, saturation, hue)


def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """mmseg's ``convert``: x * alpha + beta in fp32, clipped to [0, 255], truncated to uint8."""
    return (x.float() * alpha + beta).clamp_(0, 255).to(torch.uint8)


def _hdiv_sdiv() -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's tables: sdiv[v] = round(255 * 2^12 / v), hdiv[d] = round(180 * 2^12 / (6 d)),
    0 at index 0 (round half to even, as its saturate_cast<int>)."""
    i = torch.arange(256, dtype=torch.float64)
    sdiv = torch.round((255 << HSV_SHIFT) / i)
    hdiv = torch.round((HUE_RANGE << HSV_SHIFT) / (6 * i))
    sdiv[0] = hdiv[0] = 0
    return hdiv.long(), sdiv.long()


_HDIV, _SDIV = _hdiv_sdiv()


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (3, H, W) -> uint8 HSV (3, H, W) as OpenCV's 8-bit ``COLOR_RGB2HSV``
    (H in [0, 180), S and V in [0, 255]), integer arithmetic as in its RGB2HSV_b."""
    r, g, b = image.long()
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    half = 1 << (HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> HSV_SHIFT
    # the sector: V is R first, then G, then B (OpenCV's order when two channels tie)
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> HSV_SHIFT                    # arithmetic shift: floor
    h = torch.where(h < 0, h + HUE_RANGE, h)
    return torch.stack([h, s, v]).clamp_(0, 255).to(torch.uint8)


# OpenCV's HSV2RGB sector table: which of (v, p, q, t) is b, g, r in each 60-degree sector
_SECTORS = torch.tensor([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """uint8 HSV (3, H, W) -> uint8 RGB (3, H, W) as OpenCV's 8-bit ``COLOR_HSV2RGB``: the fp32
    arithmetic of its HSV2RGB_b, whose vectorised loop (every pixel but a remainder of fewer
    than one SIMD block of a row) truncates x * 255 to uint8 (``v_trunc``)."""
    h = hsv[0].float() * (6.0 / HUE_RANGE)
    s = hsv[1].float() * (1.0 / 255.0)
    v = hsv[2].float() * (1.0 / 255.0)
    h = torch.fmod(h, 6.0)
    sector = torch.floor(h)
    h = h - sector
    sector = sector.long().clamp_(0, 5)
    # 1 - s * x as one fused multiply-add (exact product and sum, one rounding to fp32), as the
    # compiler contracts OpenCV's vector code on x86-64 with FMA (AVX2 and later)
    def fms(x: torch.Tensor) -> torch.Tensor:
        return (1.0 - s.double() * x.double()).float()

    tab = torch.stack([v, v * (1.0 - s), v * fms(h), v * fms(1.0 - h)])      # (4, H, W)
    bgr = torch.gather(tab, 0, _SECTORS[sector].permute(2, 0, 1))                      # (3, H, W)
    rgb = torch.where(s == 0, v, bgr.flip(0))                     # grey: b = g = r = v
    return (rgb * 255.0).clamp_(0, 255).to(torch.uint8)                 # truncation


def distort(image: torch.Tensor, d: PhotometricDraw) -> torch.Tensor:
    """uint8 RGB (3, H, W) -> uint8 RGB (3, H, W), mmseg's steps in its order."""
    if d.brightness is not None:
        image = _convert(image, beta=d.brightness)
    if d.contrast_first and d.contrast is not None:
        image = _convert(image, alpha=d.contrast)
    if d.saturation is not None:
        hsv = rgb_to_hsv(image)
        hsv[1] = _convert(hsv[1], alpha=d.saturation)
        image = hsv_to_rgb(hsv)
    if d.hue is not None:
        hsv = rgb_to_hsv(image)
        hsv[0] = ((hsv[0].long() + d.hue) % HUE_RANGE).to(torch.uint8)
        image = hsv_to_rgb(hsv)
    if not d.contrast_first and d.contrast is not None:
        image = _convert(image, alpha=d.contrast)
    return image


def photometric_distortion(image: torch.Tensor) -> torch.Tensor:
    """``distort`` with a fresh ``draw`` (torch's global generator)."""
    return distort(image, draw())
