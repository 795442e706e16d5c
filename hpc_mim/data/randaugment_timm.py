"""timm's RandAugment (MAE's fine-tuning ``rand-m9-mstd0.5-inc1``) on a whole uint8 batch on the
training device, each image drawing its own ops, coins, magnitudes and signs.

The reference is timm/data/auto_augment.py (``rand_augment_transform``, ``RandAugment``,
``AugmentOp``, ``LEVEL_TO_ARG``, ``NAME_TO_OP``) with the hparams timm's ``create_transform``
gives it in MAE's fine-tuning (facebookresearch/mae:util/datasets.py): ``img_mean`` = the
dataset mean x 255 rounded (the fill of the geometric ops), ``interpolation`` bicubic, and
TranslateXRel/YRel's default ``translate_pct`` 0.45 (``translate_const`` only serves the absolute
translations, which neither op table holds). Per image and per layer (``n`` of them), as timm:

- the op is drawn uniformly from the table, with replacement across layers;
- it is applied with probability ``p`` (timm: skipped when ``random() > p``);
- its magnitude is ``gauss(m, mstd)`` (uniform in [0, m] for mstd > 100), clipped to
  [0, mmax = 10], drawn afresh for every application;
- a signed op's value is negated with p = 0.5 (timm's ``_randomly_negate``).

The ops are Pillow's, batched, in hpc_mim/data/pil_ops.py (exact on a CPU against timm's PIL
ops: tests/test_randaugment_timm.py); Equalize and Posterize are shared with
hpc_mim/data/randaugment.py.

PosterizeIncreasing at magnitude 10 keeps 0 bits: a black image, as the Pillow of MAE's runs
computed it (``i & ~(2 ** 8 - 1)``); recent Pillow (13 here) refuses bits = 0, so timm's own
PIL pipeline raises there today (~2% of its PosterizeIncreasing draws at m9, mstd 0.5).

No per-image loop and no host sync on the training thread: every op runs on the whole batch
with its (B,) values and each image keeps the output of the op it drew (``torch.where``).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable

import torch

from hpc_mim.data.augment_policy import TimmRandAugment
from hpc_mim.data.pil_ops import (
    autocontrast,
    brightness,
    color,
    contrast,
    div_exact,
    invert,
    rotate_matrix,
    sharpness,
    shear_x_matrix,
    shear_y_matrix,
    solarize,
    solarize_add,
    translate_x_matrix,
    translate_y_matrix,
    warp_bicubic,
)
from hpc_mim.data.randaugment import (
    Op,
    _column,
    equalize,
    identity,
    posterize,
    values_for,
)

TRANSLATE_PCT = 0.45                     # timm's translate_pct default (TranslateXRel / YRel)


# ------------------------------------------------------------------ timm's levels and tables

def _scaled(scale: float, offset: float = 0.0) -> Callable:
    """timm's ``(level / _LEVEL_DENOM) * scale [+ offset]`` in float64."""
    def level(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
        v = div_exact(m, 10.0) * scale
        return v + offset if offset else v
    return level


def _posterize_level(increasing: bool) -> Callable:
    def level(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
        bits = torch.trunc(div_exact(m, 10.0) * 4)
        return 4 - bits if increasing else bits
    return level


def _solarize_level(increasing: bool) -> Callable:
    def level(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
        thresh = torch.trunc(div_exact(m, 10.0) * 256).clamp(max=256)
        return 256 - thresh if increasing else thresh
    return level


def _solarize_add_level(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return torch.trunc(div_exact(m, 10.0) * 110).clamp(max=128)


def _increasing(kernel: Callable) -> Callable:
    """timm's ``_enhance_increasing_level_to_arg``: factor ``max(0.1, 1 + (+-level))``."""
    def apply(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kernel(x, (1.0 + v).clamp(min=0.1))
    return apply


def timm_ops(increasing: bool) -> dict[str, Op]:
    """timm's ``_RAND_INCREASING_TRANSFORMS`` (``increasing``) or ``_RAND_TRANSFORMS``, in its
    order, with its level functions. In this table ``Op.affine`` gives PIL's (B, 6) matrix."""
    enhance = (lambda k: Op(_scaled(0.9), True, _increasing(k))) if increasing else \
        (lambda k: Op(_scaled(1.8, 0.1), False, k))
    suffix = "Increasing" if increasing else ""
    return {
        "AutoContrast": Op(None, False, autocontrast),
        "Equalize": Op(None, False, equalize),
        "Invert": Op(None, False, invert),
        "Rotate": Op(_scaled(30.0), True, affine=rotate_matrix),
        f"Posterize{suffix}": Op(_posterize_level(increasing), False, posterize),
        f"Solarize{suffix}": Op(_solarize_level(increasing), False, solarize),
        "SolarizeAdd": Op(_solarize_add_level, False, solarize_add),
        f"Color{suffix}": enhance(color),
        f"Contrast{suffix}": enhance(contrast),
        f"Brightness{suffix}": enhance(brightness),
        f"Sharpness{suffix}": enhance(sharpness),
        "ShearX": Op(_scaled(0.3), True, affine=shear_x_matrix),
        "ShearY": Op(_scaled(0.3), True, affine=shear_y_matrix),
        "TranslateXRel": Op(_scaled(TRANSLATE_PCT), True, affine=translate_x_matrix),
        "TranslateYRel": Op(_scaled(TRANSLATE_PCT), True, affine=translate_y_matrix),
    }


INCREASING, PLAIN = timm_ops(True), timm_ops(False)


# ------------------------------------------------------------------ batched timm RandAugment

def apply_timm_ops(x: torch.Tensor, choice: torch.Tensor, magnitudes: torch.Tensor, negate: torch.Tensor,
                   ops: dict[str, Op], fill: torch.Tensor) -> torch.Tensor:
    """One layer: image i of x (B, C, H, W) uint8 through op number ``choice[i]`` of ``ops``
    (-1: none, the op's coin failed) at magnitude ``magnitudes[i]`` (float64), negated where
    ``negate[i]``. Every op runs on the whole batch; the geometric ones share one warp."""
    h, w = x.shape[-2:]
    out, matrix, warped = x, None, torch.zeros_like(choice, dtype=torch.bool)
    for k, op in enumerate(ops.values()):
        chosen = choice == k
        v = values_for(op, magnitudes, negate, h, w)
        if op.affine is not None:
            m = op.affine(v, h, w)
            matrix = m if matrix is None else torch.where(chosen[:, None], m, matrix)
            warped = warped | chosen
        elif op.apply is not identity:
            out = torch.where(_column(chosen), op.apply(x, v), out)
    if matrix is not None:
        out = torch.where(_column(warped), warp_bicubic(x, matrix, fill), out)
    return out


def draw_magnitudes(policy: TimmRandAugment, b: int, device: torch.device) -> torch.Tensor:
    """(B,) float64: timm's ``AugmentOp`` magnitude, one per image: ``gauss(m, mstd)`` (uniform
    in [0, m] for mstd = inf, m for mstd = 0), clipped to [0, mmax]."""
    m = torch.full((b,), float(policy.magnitude), dtype=torch.float64, device=device)
    if policy.magnitude_std == math.inf:
        m = torch.rand(b, dtype=torch.float64, device=device) * policy.magnitude
    elif policy.magnitude_std > 0:
        m = m + policy.magnitude_std * torch.randn(b, dtype=torch.float64, device=device)
    return m.clamp(0.0, policy.magnitude_max)


@functools.lru_cache(maxsize=None)
def fill_for(mean: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """timm's ``img_mean`` as create_transform builds it (``min(255, round(255 * m))``, Python's
    round), a (C,) uint8 tensor on ``device``, copied once without waiting for it."""
    with torch.inference_mode(False):
        values = torch.tensor([min(255, round(255 * m)) for m in mean], dtype=torch.uint8)
        return values.to(device, non_blocking=True)


def rand_augment_timm(x: torch.Tensor, policy: TimmRandAugment, fill: torch.Tensor) -> torch.Tensor:
    """timm's RandAugment ``policy`` on each image of x (B, 3, H, W) uint8 on x's device and
    generator; ``fill`` (3,) uint8 (``fill_for(mean, device)``)."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise TypeError(f"timm's RandAugment takes uint8 RGB (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    ops = INCREASING if policy.increasing else PLAIN
    b, dev = x.shape[0], x.device
    # the warp's coordinates and the blends are float64 / float32 arithmetic: not under autocast
    no_autocast = torch.autocast(dev.type, enabled=False) if dev.type in ("cpu", "cuda") else None
    with no_autocast or contextlib.nullcontext():
        for _ in range(policy.num_layers):
            choice = torch.randint(len(ops), (b,), device=dev)           # with replacement
            applied = torch.rand(b, device=dev) <= policy.prob            # timm skips if random() > p
            choice = torch.where(applied, choice, -1)
            magnitudes = draw_magnitudes(policy, b, dev)
            negate = torch.rand(b, device=dev) > 0.5                     # timm's _randomly_negate
            x = apply_timm_ops(x, choice, magnitudes, negate, ops, fill)
    return x
