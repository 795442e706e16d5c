"""hpc_mim/data/randaugment_timm.py against timm's own RandAugment (timm/data/auto_augment.py,
PIL ops) with the hparams timm's create_transform gives MAE's fine-tuning."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa

from hpc_mim.data import randaugment_timm as ra
from hpc_mim.data.augment_policy import (
    TimmRandAugment,
    TorchvisionRandAugment,
    parse_auto_augment,
)

MEAN = (0.485, 0.456, 0.406)
FILL = tuple(min(255, round(255 * m)) for m in MEAN)                 # (124, 116, 104)


def hparams(size: int) -> dict:
    """What timm's transforms_imagenet_train passes rand_augment_transform for MAE."""
    return dict(translate_const=int(size * 0.45), img_mean=FILL, interpolation=Image.BICUBIC)


def images() -> torch.Tensor:
    """(5, 3, 20, 24) uint8: noise, a smooth gradient, a low-contrast image, one with a flat
    channel, a dark one (H != W catches swapped axes)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (3, 20, 24), generator=g)
    yy, xx = torch.meshgrid(torch.arange(20), torch.arange(24), indexing="ij")
    gradient = torch.stack([xx * 10, yy * 12, (xx + yy) * 5]).clamp(0, 255)
    low = torch.randint(100, 141, (3, 20, 24), generator=g)
    flat = noise.clone()
    flat[1] = 77
    dark = torch.randint(0, 40, (3, 20, 24), generator=g)
    return torch.stack([noise, gradient, low, flat, dark]).to(torch.uint8)


def timm_op(name: str, img: torch.Tensor, magnitude: float, negative: bool, monkeypatch) -> torch.Tensor:
    """timm's AugmentOp(name) at a fixed magnitude and sign (prob 1, no noise) on one image."""
    monkeypatch.setattr(timm_aa, "_randomly_negate", (lambda v: -v) if negative else (lambda v: v))
    op = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams(min(img.shape[-2:])))
    if name.startswith("Posterize") and op.level_fn(magnitude, op.hparams)[0] == 0:
        # PosterizeIncreasing at magnitude 10 keeps 0 bits. Pillow >= 9.? refuses bits=0
        # (ValueError: timm's own pipeline crashes on it); the Pillow of MAE's runs computed
        # its table, ``i & ~(2 ** 8 - 1)``: a black image. That is the reference here.
        with pytest.raises(ValueError, match="bits"):
            op(Image.fromarray(img.permute(1, 2, 0).numpy()))
        return torch.zeros_like(img)
    out = op(Image.fromarray(img.permute(1, 2, 0).numpy()))
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


OPS = list(ra.INCREASING) + [n for n in ra.PLAIN if n not in ra.INCREASING]


@pytest.mark.parametrize("name", OPS)
def test_each_batched_op_is_timms_pil_op_on_every_image(name, monkeypatch):
    """Exact on a CPU, no tolerance: the same float types and operation order as Pillow's C
    code (a reciprocal instead of a division, or a float64 blend, was off by 1 at some pixels)."""
    table = ra.INCREASING if name in ra.INCREASING else ra.PLAIN
    k = list(table).index(name)
    x = images()
    b = x.shape[0]
    fill = ra.fill_for(MEAN, x.device)
    for magnitude in (0.0, 3.7, 6.2831, 9.0, 10.0):
        for negative in (False, True):
            got = ra.apply_timm_ops(x, torch.full((b,), k), torch.full((b,), magnitude, dtype=torch.float64),
                                    torch.full((b,), negative), table, fill)
            want = torch.stack([timm_op(name, img, magnitude, negative, monkeypatch) for img in x])
            diff = (got.int() - want.int()).abs()
            assert torch.equal(got, want), (name, magnitude, negative, diff.max().item(),
                                            (diff > 0).sum().item())


def test_an_image_whose_coin_fails_is_unchanged_and_each_keeps_its_own_op(monkeypatch):
    x = images()
    fill = ra.fill_for(MEAN, x.device)
    names = list(ra.INCREASING)
    choice = torch.tensor([-1, names.index("Invert"), names.index("ShearX"), names.index("Equalize"), -1])
    got = ra.apply_timm_ops(x, choice, torch.full((5,), 9.0, dtype=torch.float64), torch.zeros(5, dtype=torch.bool),
                            ra.INCREASING, fill)
    assert torch.equal(got[0], x[0]) and torch.equal(got[4], x[4])
    assert torch.equal(got[1], timm_op("Invert", x[1], 9.0, False, monkeypatch))
    assert torch.equal(got[2], timm_op("ShearX", x[2], 9.0, False, monkeypatch))
    assert torch.equal(got[3], timm_op("Equalize", x[3], 9.0, False, monkeypatch))


def timm_draws(policy: str, n_images: int, seed: int = 0) -> tuple[list[int], list[float], list[str]]:
    """Run timm's own RandAugment on tiny images and record, per image, how many ops it applied,
    and every applied op's magnitude (after clipping) and name."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    transform = timm_aa.rand_augment_transform(policy, hparams(8))
    counts, mags, names = [], [], []
    for op in transform.ops:
        def level(m, hp, _fn=op.level_fn, _name=op.name):
            mags.append(m), names.append(_name)
            counts[-1] += 1
            return _fn(m, hp) if _fn else ()
        op.level_fn = level                               # called once per applied op, with the magnitude
        op.aug_fn = lambda img, *args, **kwargs: img      # only the draws matter (and Posterize(0) raises)
    img = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    for _ in range(n_images):
        counts.append(0)
        transform(img)
    return counts, mags, names


def ours_draws(policy: str, n_images: int, monkeypatch) -> tuple[list[int], list[float], list[str]]:
    calls = []
    real = ra.apply_timm_ops

    def record(x, choice, magnitudes, negate, ops, fill):
        calls.append((choice.clone(), magnitudes.clone(), list(ops)))
        return real(x, choice, magnitudes, negate, ops, fill)

    monkeypatch.setattr(ra, "apply_timm_ops", record)
    torch.manual_seed(0)
    x = torch.zeros(n_images, 3, 8, 8, dtype=torch.uint8)
    ra.rand_augment_timm(x, parse_auto_augment(policy), ra.fill_for(MEAN, x.device))
    counts = sum((c >= 0).long() for c, _, _ in calls).tolist()
    mags = torch.cat([m[c >= 0] for c, m, _ in calls]).tolist()
    names = [table[i] for c, _, table in calls for i in c[c >= 0].tolist()]
    return counts, mags, names


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-p0.8-mstd101"])
def test_sampling_matches_timms(policy, monkeypatch):
    """Per image: ops applied (binomial(n, p)), the magnitude distribution (gauss(m, mstd)
    clipped to [0, 10], or uniform), and the ops uniform over the table; 4000 images each, the
    tolerances ~4 standard errors."""
    n = 4000
    t_counts, t_mags, t_names = timm_draws(policy, n)
    o_counts, o_mags, o_names = ours_draws(policy, n, monkeypatch)
    layers = parse_auto_augment(policy).num_layers
    for k in range(layers + 1):
        t, o = t_counts.count(k) / n, o_counts.count(k) / n
        assert abs(t - o) < 0.04, (k, t, o)
    t_m, o_m = np.array(t_mags), np.array(o_mags)
    assert abs(t_m.mean() - o_m.mean()) < 4 * t_m.std() / math.sqrt(len(t_m)) * 1.5 + 1e-9
    assert abs(t_m.std() - o_m.std()) < 0.1 * t_m.std() + 1e-9
    assert t_m.max() <= 10 and o_m.max() <= 10 and o_m.min() >= 0
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(t_m, q) - np.quantile(o_m, q)) < 0.1 * max(1.0, t_m.std())
    assert set(o_names) == set(t_names) == {timm_aa.rand_augment_transform(policy, hparams(8)).ops[i].name
                                                for i in range(15)}
    counts = np.array([o_names.count(name) for name in set(o_names)]) / len(o_names)
    assert np.abs(counts - 1 / 15).max() < 0.015


def test_policy_grammar():
    assert parse_auto_augment("rand-m9-mstd0.5-inc1") == TimmRandAugment(9, 2, 0.5, 0.5, 10.0, True)
    assert parse_auto_augment("rand-n3-m7-p0.8-mstd101-mmax12") == TimmRandAugment(7, 3, 0.8, math.inf, 12.0)
    assert parse_auto_augment("rand") == TimmRandAugment()
    assert parse_auto_augment("tv-rand-n2-m9") == TorchvisionRandAugment(2, 9)
    assert parse_auto_augment("") is None
    for bad in ("rand-m9-tweights", "rand-x3", "augmix-m5", "rand-m9-", "tv-rand-m40", "rand-p2"):
        with pytest.raises(ValueError):
            parse_auto_augment(bad)


def test_a_callers_autocast_changes_nothing_and_the_config_refuses_unknown_keys():
    from hpc_mim.config_error import ConfigError
    from hpc_mim.eval_options import FinetuneConfig
    x = images()
    policy = parse_auto_augment("rand-m9-mstd0.5-inc1")
    torch.manual_seed(3)
    plain = ra.rand_augment_timm(x, policy, ra.fill_for(MEAN, x.device))
    torch.manual_seed(3)
    with torch.autocast("cpu", torch.bfloat16):       # the bicubic warp and blends stay float64 / 32
        assert torch.equal(ra.rand_augment_timm(x, policy, ra.fill_for(MEAN, x.device)), plain)
    assert FinetuneConfig().auto_augment == "rand-m9-mstd0.5-inc1"           # MAE's
    with pytest.raises(ConfigError, match="eval.finetune.auto_augment"):
        FinetuneConfig(auto_augment="rand-m9-tweights").validate()
