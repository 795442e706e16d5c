"""RandAugment on a whole uint8 batch on the training device, each image drawing its own ops.

torchvision's ``v2.RandAugment`` (Cubuk et al., arXiv 1909.13719) draws one op list per call,
so a batch had to be augmented image by image: B Python calls per step on the training
thread, and on a GPU host round trips in several ops (``affine``/``rotate`` and
``adjust_sharpness`` copy their matrix or kernel with a blocking ``torch.tensor(...,
device=...)``, ``autocontrast`` assigns through a boolean mask, i.e. ``nonzero``).
timm's RandAugment works on PIL images, one at a time; kornia has a batched tensor one, but is
not a dependency of this project. Here every op runs on the whole batch with a per-image
parameter (B,), and each image keeps the output of the op it drew (``torch.where``): about 14
cheap full-batch passes per round, one ``grid_sample`` for all geometric ops, no per-image
loop and no host sync (no ``.item()``, no boolean-mask indexing, no ``nonzero``).

The semantics are torchvision's (the ``TORCHVISION`` table): its 14 ops including Identity, its
magnitude table (``num_magnitude_bins=31``), a random sign per signed op, fill 0, nearest
interpolation, uint8 arithmetic. Every op takes its per-image value as a (B,) float64 tensor,
and ``Op.level`` maps per-image magnitudes (B,) to those values. timm's policy (MAE's
fine-tuning, ``rand-m9-mstd0.5-inc1``) is another table of ``Op``s in
hpc_mim/data/randaugment_timm.py (PIL's ops: its blends, bicubic warp and fill differ from
torchvision's; it shares ``posterize``, ``equalize`` and ``values_for`` with this file).
Fine-tuning uses timm's; this table is the ``tv-rand-n2-m9`` option.

Bit-exactness with torchvision: on a CPU every op equals torchvision.transforms.v2.functional's
per image with no tolerance (tests/test_views.py: 14 ops, 5 magnitudes, both signs, 2 sizes);
tests/gpu compares on a GPU, where cuBLAS and nvcc may decide a rare value otherwise.
- torchvision's blends compute ``a + alpha * b`` in one float32 ``add_(b, alpha=...)``, which
  torch's CPU vector path evaluates as a fused multiply-add (one rounding; nvcc contracts the
  CUDA kernel's the same way by default). With a per-image alpha there is no scalar
  ``alpha``; the same sum is formed exactly in float64 and rounded once to float32, which is
  the fused result (the float32 operands' products and sums fit in float64's 53 bits for pixel
  values; a double rounding would need a sum within 2^-45 of a float32 midpoint). A plain
  float32 ``a * r + b * (1 - r)`` (two roundings) truncated to another uint8 in ~0.1% of the
  values of a 64 x 64 test batch. Then the same clamp and truncation to uint8.
- The affine ops build torchvision's inverse matrix (``_get_inverse_affine_matrix``) in float64
  per image, round it to float32 as ``torch.tensor(matrix)`` does, and sample the same grid
  (``_affine_grid``: pixel-centre base grid, theta divided by half the size, align_corners
  False) with ``grid_sample(mode="nearest")``; only the matrix's sines and cosines come from
  torch instead of Python's ``math`` (equal to the last float64 bit or so, invisible after the
  rounding to float32).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import RandAugment as _TorchvisionRandAugment
from torchvision.transforms.v2 import functional as TF

Level = Callable[[torch.Tensor, int, int], torch.Tensor]      # magnitudes (B,), H, W -> values (B,)


class Op(NamedTuple):
    """One augmentation. Exactly one of ``apply`` (uint8 (B, C, H, W), values (B,) -> uint8
    (B, C, H, W)) and ``affine`` (values (B,), H, W -> (B, k) float64 warp parameters: here
    the 7 ``AFFINE`` ones, in randaugment_timm.py PIL's 6 matrix entries) is set: the
    geometric ops give parameters, so one matrix computation and one warp serve them all. ``level``: per-image magnitudes -> unsigned values (None:
    the op takes no value); ``signed``: each image negates its value with p = 0.5."""
    level: Level | None
    signed: bool
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    affine: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None


# ------------------------------------------------------------------ geometric ops (one grid_sample)

# the arguments of torchvision's _get_inverse_affine_matrix (scale 1), degrees and pixels, the
# centre relative to the image centre
AFFINE = ("angle", "tx", "ty", "shear_x", "shear_y", "cx", "cy")


def _affine(v: torch.Tensor, **given: torch.Tensor | float) -> torch.Tensor:
    """(B, 7) AFFINE parameters: those ``given`` (a (B,) tensor or a float), 0 elsewhere."""
    columns = (given.get(name, 0.0) for name in AFFINE)
    return torch.stack([c if isinstance(c, torch.Tensor) else torch.full_like(v, c) for c in columns], dim=1)


def inverse_affine(p: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_get_inverse_affine_matrix(center, angle, translate, scale=1, shear)``
    for a batch of AFFINE parameters p (B, 7) float64: the same float64 operations in the same
    order -> (B, 6), [a, b, c, d, e, f] mapping an output pixel to its input pixel (centred)."""
    angle, tx, ty, shear_x, shear_y, cx, cy = p.unbind(dim=1)
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    cos_sy, tan_sx, rot_minus_sy = torch.cos(sy), torch.tan(sx), rot - sy
    cx_plus_tx, cy_plus_ty = cx + tx, cy + ty
    a = torch.cos(rot_minus_sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot_minus_sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a                  # [d, -b, 0, -c, a, 0] / scale, scale = 1
    m2 = 0.0 + (cx - m0 * cx_plus_tx - m1 * cy_plus_ty)
    m5 = 0.0 + (cy - m3 * cx_plus_tx - m4 * cy_plus_ty)
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1)


def _shear_x(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """F.affine(shear=[degrees(atan(v)), 0], center=[0, 0]): sheared about the top-left corner."""
    return _affine(v, shear_x=torch.rad2deg(torch.atan(v)), cx=-0.5 * w, cy=-0.5 * h)


def _shear_y(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return _affine(v, shear_y=torch.rad2deg(torch.atan(v)), cx=-0.5 * w, cy=-0.5 * h)


def _translate_x(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """F.affine(translate=[int(v), 0]): whole pixels, truncated towards zero."""
    return _affine(v, tx=torch.trunc(v))


def _translate_y(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return _affine(v, ty=torch.trunc(v))


def _rotate(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """F.rotate(angle=v) about the centre, counter-clockwise: the angle taken mod 360, then
    negated (torchvision's ``rotate_image``). Its fast paths for multiples of 90 degrees (rot90)
    are not reachable at RandAugment's magnitudes (|v| <= 30)."""
    return _affine(v, angle=-torch.remainder(v, 360.0))


def warp(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Each image of x (B, C, H, W) uint8 through its own inverse affine ``matrix`` (B, 6)
    float64, as torchvision's ``affine_image`` (nearest, fill None = zeros) does one image:
    theta rounded to float32, its ``_affine_grid`` and ``_apply_grid_transform``."""
    b, _, h, w = x.shape
    dev = x.device
    theta = matrix.to(torch.float32).view(b, 2, 3)
    base = torch.empty(1, h, w, 3, device=dev)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).unsqueeze_(-1))
    base[..., 2].fill_(1)
    # the divisor built on the device (two fills): torch.tensor(..., device=cuda) would be a
    # blocking copy, and dividing by a Python scalar multiplies by its reciprocal instead
    half = torch.stack([torch.full((), 0.5 * w, device=dev), torch.full((), 0.5 * h, device=dev)])
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(theta.transpose(1, 2) / half)
    out = F.grid_sample(x.float(), grid.view(b, h, w, 2), mode="nearest", padding_mode="zeros",
                        align_corners=False)
    return out.round_().to(torch.uint8)


# ------------------------------------------------------------------ colour ops (per-image factors)

def _gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_rgb_to_grayscale_image(preserve_dtype=False)``, floored for uint8:
    uint8 (B, 3, H, W) -> float32 (B, 1, H, W), the same float32 operations."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).floor_()


def _column(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: ``x.mul(ratio).add_(other, alpha=1 - ratio)``, clamped and
    truncated to uint8, with a per-image ``ratio`` (B,) float64. ``mul`` rounds ratio to
    float32; the ``add_`` with ``alpha`` is one fused multiply-add in float32, formed here
    exactly in float64 and rounded once (see the module docstring)."""
    r = _column(ratio)
    scaled = x.float() * r.float()
    alpha = (1.0 - r).float().double()                         # the kernel's float32 alpha
    fused = (scaled.double() + other.double() * alpha).float()
    return fused.clamp_(0, 255).to(torch.uint8)


def brightness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.adjust_brightness(factor 1 + v): x * factor, clamped, truncated."""
    return (x.float() * _column(1.0 + v).float()).clamp_(0, 255).to(torch.uint8)


def color(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.adjust_saturation(factor 1 + v): a blend with the floored grayscale."""
    return _blend(x, _gray(x), 1.0 + v)


def contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.adjust_contrast(factor 1 + v): a blend with the mean of the floored grayscale."""
    return _blend(x, torch.mean(_gray(x), dim=(-3, -2, -1), keepdim=True), 1.0 + v)


def sharpness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.adjust_sharpness(factor 1 + v): inner pixels move from the rounded 3x3 smoothing
    (1s around a 5, /13) by 1 - factor; the border stays."""
    _, c, h, w = x.shape
    if h <= 2 or w <= 2:
        return x
    kernel = torch.full((c, 1, 3, 3), 1.0 / 13.0, device=x.device)   # fills: no host copy
    kernel[:, :, 1, 1].fill_(5.0 / 13.0)
    out = x.float()
    blurred = F.conv2d(out, kernel, groups=c).round_()
    inner = out[..., 1:-1, 1:-1]
    alpha = _column(1.0 - (1.0 + v)).float().double()          # add_(..., alpha=1 - factor)
    inner.copy_((inner.double() + (blurred - inner).double() * alpha).float())
    return out.clamp_(0, 255).to(torch.uint8)


def posterize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.posterize(bits=int(v)): keep the top ``bits`` bits of each channel."""
    bits = torch.trunc(v).clamp(0, 8).long()
    mask = 256 - torch.bitwise_left_shift(torch.ones_like(bits), 8 - bits)   # ((1 << b) - 1) << (8 - b)
    return x & _column(mask.to(torch.uint8))


def solarize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.solarize(threshold=255 v): invert the values >= the threshold (compared in float32)."""
    return torch.where(x >= _column(255.0 * v).float(), 255 - x, x)


def autocontrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.autocontrast: each channel stretched to [0, 255]; a flat channel is left as is.
    torchvision's assigns through a boolean mask (a host sync on a GPU); ``where`` here."""
    f = x.float()
    low = f.amin(dim=(-2, -1), keepdim=True)
    high = f.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, 1.0, (high - low).mul_(1.0 / 255))
    return (f - torch.where(flat, 0.0, low)).div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def equalize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.equalize (PIL's histogram equalisation per channel): torchvision's kernel is already
    batched and sync-free (a scatter_add histogram, a cumsum, a gathered lookup table)."""
    return TF.equalize(x)


def identity(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x


# ------------------------------------------------------------------ torchvision's policy

_SPACE = _TorchvisionRandAugment._AUGMENTATION_SPACE


@functools.lru_cache(maxsize=None)
def _table(name: str, num_bins: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """torchvision's magnitude table of op ``name`` (num_bins,), float64 on ``device``; the
    same CPU float32 numbers (a closed form differs from torch.linspace by an ulp at some
    bins). Copied once per device, without waiting for it."""
    with torch.inference_mode(False):               # cached: usable outside inference mode too
        return _SPACE[name][0](num_bins, h, w).double().to(device, non_blocking=True)


def _torchvision_level(name: str, num_bins: int) -> Level:
    """Level of op ``name``: torchvision's table at each image's magnitude, an integer bin."""
    def level(magnitudes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return _table(name, num_bins, h, w, magnitudes.device)[magnitudes.long()]
    return level


def torchvision_ops(num_bins: int = 31) -> dict[str, Op]:
    """torchvision v2 RandAugment's 14 ops, in its order, with its magnitude tables."""
    kinds: dict[str, dict] = {
        "Identity": dict(apply=identity), "ShearX": dict(affine=_shear_x), "ShearY": dict(affine=_shear_y),
        "TranslateX": dict(affine=_translate_x), "TranslateY": dict(affine=_translate_y),
        "Rotate": dict(affine=_rotate), "Brightness": dict(apply=brightness), "Color": dict(apply=color),
        "Contrast": dict(apply=contrast), "Sharpness": dict(apply=sharpness),
        "Posterize": dict(apply=posterize), "Solarize": dict(apply=solarize),
        "AutoContrast": dict(apply=autocontrast), "Equalize": dict(apply=equalize)}
    assert list(kinds) == list(_SPACE), "torchvision's RandAugment ops changed"
    ops = {}
    for name, kind in kinds.items():
        has_table = _SPACE[name][0](num_bins, 2, 2) is not None
        ops[name] = Op(level=_torchvision_level(name, num_bins) if has_table else None,
                       signed=_SPACE[name][1], **kind)
    return ops


TORCHVISION = torchvision_ops(31)


# ------------------------------------------------------------------ batched RandAugment

def values_for(op: Op, magnitudes: torch.Tensor, negate: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The (B,) float64 value each image would give ``op``: its level, negated where ``negate``
    (B,) bool if the op is signed; 0 for an op without a level."""
    if op.level is None:
        return torch.zeros_like(magnitudes)
    v = op.level(magnitudes, h, w)
    return torch.where(negate, -v, v) if op.signed else v


def apply_ops(x: torch.Tensor, choice: torch.Tensor, magnitudes: torch.Tensor, negate: torch.Tensor,
              ops: dict[str, Op]) -> torch.Tensor:
    """One round: image i of x (B, C, H, W) uint8 through op number ``choice[i]`` of ``ops``
    with magnitude ``magnitudes[i]``, negated where ``negate[i]``. Every op runs on the whole
    batch; the geometric ones share one warp with per-image matrices."""
    h, w = x.shape[-2:]
    out, params, warped = x, None, torch.zeros_like(choice, dtype=torch.bool)
    for k, op in enumerate(ops.values()):
        if op.apply is identity:
            continue
        chosen = choice == k
        v = values_for(op, magnitudes, negate, h, w)
        if op.affine is not None:
            p = op.affine(v, h, w)
            params = p if params is None else torch.where(chosen[:, None], p, params)
            warped = warped | chosen
        else:
            out = torch.where(_column(chosen), op.apply(x, v), out)
    if params is not None:
        out = torch.where(_column(warped), warp(x, inverse_affine(params)), out)
    return out


def rand_augment_uint8(x: torch.Tensor, num_ops: int = 2, magnitude: int = 9,
                       ops: dict[str, Op] | None = None) -> torch.Tensor:
    """torchvision's RandAugment(num_ops, magnitude) on each image of x (B, C, H, W) uint8, on
    x's device and generator: per round every image draws its op uniformly among ``ops``
    (torchvision's by default) and its sign (negative with p = 0.5, for signed ops)."""
    if ops is None:
        if not 0 <= magnitude < 31:            # an index into the tables (a device assert else)
            raise ValueError(f"magnitude {magnitude}: torchvision's RandAugment has 31 bins, 0-30")
        ops = TORCHVISION
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise TypeError(f"RandAugment takes uint8 (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
    b, dev = x.shape[0], x.device
    magnitudes = torch.full((b,), magnitude, dtype=torch.float64, device=dev)
    # under a caller's bf16 autocast the grid's bmm and the sharpening conv would run in bf16
    # (pixel coordinates with an 8-bit mantissa): the ops are uint8 arithmetic in float32/64
    no_autocast = torch.autocast(dev.type, enabled=False) if dev.type in ("cpu", "cuda") else None
    with no_autocast or contextlib.nullcontext():
        for _ in range(num_ops):
            choice = torch.randint(len(ops), (b,), device=dev)
            negate = torch.rand(b, device=dev) <= 0.5              # torchvision: rand() <= 0.5
            x = apply_ops(x, choice, magnitudes, negate, ops)
    return x
