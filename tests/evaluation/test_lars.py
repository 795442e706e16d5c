"""evaluation/lars.py against MAE's LARS formula (facebookresearch/mae:util/lars.py)."""
import pytest
import torch
from timm.optim import Lars

from evaluation.lars import LARS


def reference_steps(params: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float, wd: float,
                    momentum: float = 0.9, coeff: float = 0.001) -> list[torch.Tensor]:
    """MAE's update written out in float64 with Python scalars: ndim > 1 -> dp = g + wd p,
    scaled by coeff ||p|| / ||dp|| (1 where a norm is 0); ndim <= 1 -> dp = g; mu = m mu + dp
    (mu starts at 0); p -= lr mu."""
    ps = [p.double().clone() for p in params]
    mus = [torch.zeros_like(p) for p in ps]
    for step_grads in grads:
        for p, g, mu in zip(ps, step_grads, mus):
            dp = g.double()
            if p.ndim > 1:
                dp = dp + wd * p
                pn, dn = p.norm().item(), dp.norm().item()
                dp = dp * (coeff * pn / dn if pn > 0 and dn > 0 else 1.0)
            mu.mul_(momentum).add_(dp)
            p.sub_(lr * mu)
    return ps


def run(opt_cls, params: list[torch.Tensor], grads: list[list[torch.Tensor]], **kw) -> list[torch.Tensor]:
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_cls(ps, **kw)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


def tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight, bias, zero = torch.randn(4, 6, generator=g), torch.randn(4, generator=g), torch.zeros(3, 5)
    params = [weight, bias, zero]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(2)]
    return params, grads


@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("steps", [1, 2])
def test_lars_follows_maes_formula(wd, steps):
    params, grads = tensors()
    got = run(LARS, params, grads[:steps], lr=6.4, weight_decay=wd)
    want = reference_steps(params, grads[:steps], lr=6.4, wd=wd)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
    # the weight moved by about lr * 0.001 ||p|| (trust ratio), the bias by lr * |g| (none)
    if steps == 1:
        assert (got[0] - params[0]).norm().item() == pytest.approx(6.4 * 0.001 * params[0].norm().item(), rel=1e-4)
        torch.testing.assert_close(got[1], params[1] - 6.4 * grads[0][1])
        # a zero-norm matrix takes the unscaled step (q = 1), weight decay adds nothing to it
        torch.testing.assert_close(got[2], -6.4 * grads[0][2])


def test_timm_lars_without_weight_decay_is_plain_sgd_not_maes():
    """The old probe's optimizer: timm's Lars(weight_decay=0) skips the trust ratio."""
    params, grads = tensors()
    timm_out = run(Lars, params, grads[:1], lr=6.4, momentum=0.9, weight_decay=0.0)
    mae = reference_steps(params, grads[:1], lr=6.4, wd=0.0)
    torch.testing.assert_close(timm_out[0], params[0] - 6.4 * grads[0][0])          # SGD's step
    assert (timm_out[0].double() - mae[0]).abs().max() > 1.0                          # ~1000x MAE's


def test_lars_steps_where_the_parameters_are_without_a_host_sync():
    """The trust ratio stays a device tensor: the step makes no .item() / host copy (checked on
    the meta device, where any such read raises)."""
    p = torch.nn.Parameter(torch.ones(3, 4, device="meta"))
    p.grad = torch.ones(3, 4, device="meta")
    LARS([p], lr=0.1).step()
