"""Pillow's image operations on a whole uint8 batch on the device, each image with its own (B,)
value: the ops of timm's RandAugment (hpc_mim/data/randaugment_timm.py), which timm runs
through PIL one image at a time.

Pillow's C code (python-pillow/Pillow:src/libImaging) is the reference: each op here is
the same arithmetic on (B,) per-image values, in the same float types and order, so that on a
CPU the batched op equals timm's PIL op on every image exactly (tests/test_randaugment_timm.py):

- Brightness / Color / Contrast / Sharpness: ``ImageEnhance`` = ``Image.blend(degenerate, image,
  factor)``, which computes ``in1 + factor * (in2 - in1)`` in float32 (factor rounded to
  float32), clamps and truncates. Color's degenerate is PIL's "L" conversion
  (``(19595 R + 38470 G + 7471 B + 2^15) >> 16``) back to RGB; Contrast's the mean of that
  ``L`` rounded half up; Sharpness's PIL's SMOOTH filter (1s around a 5, /13, float32 sums
  row by row from 0.5, truncated; border pixels copied).
- AutoContrast: PIL's per-channel table ``int(i * 255 / (hi - lo) - lo * 255 / (hi - lo))``
  in float64. Equalize: torchvision's kernel, which is PIL's ``ImageOps.equalize`` (shared with
  hpc_mim/data/randaugment.py). Posterize: the top bits (shared). Solarize, SolarizeAdd,
  Invert: PIL's lookup tables.
- Rotate / ShearX / ShearY / TranslateXRel / TranslateYRel: PIL's ``Image.transform(AFFINE,
  BICUBIC, fillcolor)``: each output pixel centre maps through the (B, 6) float64 matrix, a
  point outside the image takes the fill, else Pillow's bicubic (a = -1 cubic convolution, 4
  x 4 clamped neighbours, rows first) in float64, truncated. All five ops of a round share one
  gather-based warp. Rotate's matrix rounds cos and sin to 15 decimals as Pillow does, with
  torch's ``round(decimals=15)`` for Python's ``round``; the two could differ in the last bit
  (not seen in a sweep of 200 magnitudes), which would move a value by 1 only where it lies
  within ~1e-13 of an integer.
- Python's and C's divisions are correctly rounded; torch's ``tensor / scalar`` multiplies by
  a reciprocal, so divisions here are by a filled tensor (``div_exact``).

On a GPU, torch's separate elementwise kernels round each float operation as the C code does
(no contraction into fused multiply-adds across kernels); tests/gpu compares there.
"""
from __future__ import annotations

import math
import struct

import torch

from hpc_mim.data.randaugment import _column

# ------------------------------------------------------------------ PIL's colour ops

def div_exact(a: torch.Tensor, d: float) -> torch.Tensor:
    """a / d correctly rounded, as C and Python divide: torch's ``tensor / scalar`` (and
    ``scalar / tensor``) multiplies by a reciprocal, which differs in the last bit (e.g.
    210 * (255 / 210) = 254.99999999999997 in Python, 255 by the reciprocal)."""
    return a / torch.full_like(a, d)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend(degenerate, x, factor)`` (Blend.c): float32 ``d + f * (x - d)``,
    each operation rounded, clamped to [0, 255], truncated; ``factor`` (B,) float64."""
    d = degenerate.float()
    return (d + _column(factor).float() * (x.float() - d)).clamp_(0, 255).to(torch.uint8)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> "L" (Convert.c, ITU-R 601-2 in 16-bit fixed point, rounded): (B, 1, H, W)."""
    r, g, b = x.int().unbind(dim=-3)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(-3)


def brightness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness(x).enhance(v): a blend with black."""
    return _blend(torch.zeros_like(x), x, v)


def color(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color(x).enhance(v): a blend with the "L" image."""
    return _blend(_luma(x).expand_as(x), x, v)


def contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast(x).enhance(v): a blend with ``int(mean(L) + 0.5)`` (ImageStat's
    float64 mean of the integer histogram)."""
    luma = _luma(x)
    n = luma.shape[-1] * luma.shape[-2]
    mean = torch.floor(div_exact(luma.sum(dim=(-3, -2, -1), keepdim=True).double(), n) + 0.5)
    return _blend(mean.expand_as(x), x, v)


def _float32(v: float) -> float:
    """v rounded to float32 (a Python float that float32 arithmetic takes exactly)."""
    return struct.unpack("f", struct.pack("f", v))[0]


_K_SIDE, _K_MID = _float32(1 / 13), _float32(5 / 13)      # SMOOTH's kernel, normalised as Pillow's


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """Pillow's ``ImageFilter.SMOOTH`` (Filter.c ImagingFilter3x3, kernel 1s around a 5 over
    13): float32 sum from 0.5, row below, row, row above, each row ``(l k0 + c k1) + r k2``;
    clamped, truncated; the border rows and columns copied."""
    h, w = x.shape[-2:]
    if h < 3 or w < 3:
        return x
    f = x.float()
    ss = torch.full_like(f[..., 1:-1, 1:-1], 0.5)
    for dy in (1, 0, -1):                                    # in1, in0, in_1 of Filter.c
        rows = f[..., 1 + dy:h - 1 + dy, :]
        centre = _K_MID if dy == 0 else _K_SIDE
        ss = ss + ((rows[..., :-2] * _K_SIDE + rows[..., 1:-1] * centre) + rows[..., 2:] * _K_SIDE)
    out = x.clone()
    out[..., 1:-1, 1:-1] = ss.clamp_(0, 255).to(torch.uint8)
    return out


def sharpness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness(x).enhance(v): a blend with the SMOOTH-filtered image."""
    return _blend(_smooth(x), x, v)


def autocontrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0): per channel, ``int(i * scale + offset)`` with ``scale =
    255.0 / (hi - lo)``, ``offset = -lo * scale`` in float64, clamped; hi <= lo: unchanged."""
    f = x.double()
    lo = f.amin(dim=(-2, -1), keepdim=True)
    hi = f.amax(dim=(-2, -1), keepdim=True)
    flat = hi <= lo
    scale = torch.full_like(lo, 255.0) / torch.where(flat, 1.0, hi - lo)    # see div_exact
    offset = -lo * scale
    stretched = torch.trunc(f * scale + offset).clamp_(0, 255).to(torch.uint8)
    return torch.where(flat, x, stretched)


def solarize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ImageOps.solarize(threshold=v): values >= v inverted (v an integer 0-256)."""
    return torch.where(x.int() >= _column(v).int(), 255 - x, x)


def solarize_add(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """timm's ``solarize_add(add=v, thresh=128)``: values < 128 get ``min(255, i + v)``."""
    added = (x.int() + _column(v).int()).clamp_(max=255).to(torch.uint8)
    return torch.where(x < 128, added, x)


def invert(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ImageOps.invert."""
    return 255 - x


# ------------------------------------------------------------------ PIL's affine, bicubic

def _matrix(v: torch.Tensor, a0=1.0, a1=0.0, a2=0.0, a3=0.0, a4=1.0, a5=0.0) -> torch.Tensor:
    """(B, 6) float64 PIL AFFINE data (input point = [a0 a1 a2; a3 a4 a5] @ output point)."""
    return torch.stack([c if isinstance(c, torch.Tensor) else torch.full_like(v, c)
                        for c in (a0, a1, a2, a3, a4, a5)], dim=1)


def shear_x_matrix(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return _matrix(v, a1=v)                                   # timm: (1, factor, 0, 0, 1, 0)


def shear_y_matrix(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return _matrix(v, a3=v)


def translate_x_matrix(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return _matrix(v, a2=v * w)                               # pixels = pct * img.size[0]


def translate_y_matrix(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return _matrix(v, a5=v * h)


def rotate_matrix(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pillow's ``Image.rotate(v)`` matrix (about (w/2, h/2), no expand): the angle taken mod 360,
    ``-radians``, cos / sin rounded to 15 decimals, the centre folded into the offsets."""
    angle = -(torch.remainder(v, 360.0) * (math.pi / 180.0))
    cos, sin = torch.round(torch.cos(angle), decimals=15), torch.round(torch.sin(angle), decimals=15)
    cx, cy = w / 2, h / 2
    c = cos * -cx + sin * -cy + 0.0 + cx
    f = -sin * -cx + cos * -cy + 0.0 + cy
    return _matrix(v, cos, sin, c, -sin, cos, f)


def _cubic(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor,
           d: torch.Tensor) -> torch.Tensor:
    """Pillow's BICUBIC macro (Geometry.c, a = -1), the same float64 operations in order."""
    p2 = v3 - v1
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = v2 - v1 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def warp_bicubic(x: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Each image of x (B, C, H, W) uint8 through its PIL AFFINE ``matrix`` (B, 6) float64 with
    Pillow's bicubic filter; points outside the image take ``fill`` (C,) uint8 (timm's
    ``img_mean``). Pillow's ``bicubic_filter32RGB`` on every output pixel, batched: the 16
    neighbours are gathered (indices clamped, as Pillow's XCLIP and its row fallbacks do)."""
    b, c, h, w = x.shape
    dev = x.device
    xo = (torch.arange(w, device=dev, dtype=torch.float64) + 0.5).view(1, 1, w)
    yo = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5).view(1, h, 1)
    a = matrix.view(b, 6, 1, 1).unbind(dim=1)                                 # each (B, 1, 1)
    xin = a[0] * xo + a[1] * yo + a[2]                                        # (B, H, W)
    yin = a[3] * xo + a[4] * yo + a[5]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xs, ys = xin - 0.5, yin - 0.5
    x0, y0 = torch.floor(xs), torch.floor(ys)
    dx, dy = (xs - x0).unsqueeze(1), (ys - y0).unsqueeze(1)                   # (B, 1, H, W)
    cols = [(x0 + k).clamp_(0, w - 1).long() for k in (-1, 0, 1, 2)]
    flat = x.reshape(b, c, h * w)
    rows = []
    for k in (-1, 0, 1, 2):
        row = (y0 + k).clamp_(0, h - 1).long() * w
        taps = [flat.gather(2, (row + col).view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w).double()
                for col in cols]
        rows.append(_cubic(*taps, dx))
    v = _cubic(*rows, dy)
    out = v.clamp_(0, 255).to(torch.uint8)
    return torch.where(inside.unsqueeze(1), out, fill.view(1, c, 1, 1))
