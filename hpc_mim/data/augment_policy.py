"""Fine-tuning's RandAugment policy string, parsed without torch (the login-node CLI validates
configs with it before anything is queued).

``rand-...`` is timm's grammar (timm/data/auto_augment.py:rand_augment_transform): dash-separated
sections after ``rand``, in any order, each a key and a number:

- ``m``: integer magnitude on timm's 0-10 scale (default 10)
- ``n``: integer ops per image (default 2)
- ``p``: probability that each drawn op is applied (default 0.5)
- ``mstd``: std of the Gaussian noise on the magnitude, per op application (default 0; above
  100 means uniform in [0, m], as timm)
- ``mmax``: the magnitude's upper clip (default 10)
- ``inc``: 1 = timm's "increasing" op table (default 0)

MAE fine-tunes with ``rand-m9-mstd0.5-inc1`` (facebookresearch/mae:main_finetune.py). timm's
``t`` section (weighted or "3a" op sets) is not supported: it is refused here, as is any other
key, where timm would assert or silently skip it.

``tv-rand-n<N>-m<M>`` selects torchvision's ``RandAugment(N, M)`` (31 magnitude bins), the
project's fine-tuning augmentation before issue 28, kept as an explicit option.
``""`` disables RandAugment.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TimmRandAugment:
    """timm's RandAugment settings (defaults: timm's when a section is absent)."""
    magnitude: int = 10
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0          # math.inf: uniform in [0, magnitude]
    magnitude_max: float = 10.0
    increasing: bool = False


@dataclass(frozen=True)
class TorchvisionRandAugment:
    """torchvision's RandAugment(num_ops, magnitude), magnitude a bin of 0-30."""
    num_ops: int = 2
    magnitude: int = 9


def _sections(spec: str, prefix: str) -> dict[str, str]:
    out = {}
    for section in spec[len(prefix):].split("-")[1:]:
        match = re.fullmatch(r"([a-z]+)(\d[\d.]*)", section)
        if not match:
            raise ValueError(f"{spec!r}: section {section!r} is not a key followed by a number")
        out[match.group(1)] = match.group(2)
    return out


def parse_auto_augment(spec: str) -> TimmRandAugment | TorchvisionRandAugment | None:
    """The policy named by ``spec`` (see the module docstring); None for ""; ValueError with
    the offending section otherwise."""
    if not spec:
        return None
    try:
        if spec == "tv-rand" or spec.startswith("tv-rand-"):
            s = _sections(spec, "tv-rand")
            unknown = set(s) - {"n", "m"}
            if unknown:
                raise ValueError(f"{spec!r}: unknown section(s) {sorted(unknown)}; tv-rand takes n and m")
            policy = TorchvisionRandAugment(int(s.get("n", 2)), int(s.get("m", 9)))
            if not 0 <= policy.magnitude < 31:
                raise ValueError(f"{spec!r}: torchvision's magnitude is a bin of 0-30")
            return policy
        if spec == "rand" or spec.startswith("rand-"):
            s = _sections(spec, "rand")
            unknown = set(s) - {"m", "n", "p", "mstd", "mmax", "inc"}
            if unknown:
                raise ValueError(f"{spec!r}: unknown section(s) {sorted(unknown)}; supported: "
                                 "m, n, p, mstd, mmax, inc (timm's t is not)")
            mstd = float(s.get("mstd", 0.0))
            policy = TimmRandAugment(
                magnitude=int(s.get("m", 10)), num_layers=int(s.get("n", 2)), prob=float(s.get("p", 0.5)),
                magnitude_std=math.inf if mstd > 100 else mstd,
                magnitude_max=float(int(s["mmax"])) if "mmax" in s else 10.0,
                increasing=bool(int(s.get("inc", 0))))
            if not 0 <= policy.prob <= 1:
                raise ValueError(f"{spec!r}: p must be in [0, 1]")
            return policy
    except ValueError as e:
        if str(e).startswith(repr(spec)):
            raise
        raise ValueError(f"{spec!r}: {e}") from None
    raise ValueError(f"{spec!r}: give timm's rand-... (e.g. rand-m9-mstd0.5-inc1), tv-rand-n2-m9, or ''")
