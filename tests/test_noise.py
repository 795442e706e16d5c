import math

import torch

from hpc_mim.noise import add_noise, cosine_alphas_cumprod


def test_cosine_schedule_telescopes_to_f_of_t_plus_one_over_f_zero():
    ab = cosine_alphas_cumprod(1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 10, 500, 900):
        assert math.isclose(ab[t].item(), f(t + 1) / f(0), rel_tol=1e-9)
    assert ab.shape == (1000,) and (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < 1e-4


def test_add_noise_mixes_per_sample():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    xt, _ = add_noise(x0, torch.tensor([1.0, 0.25]), eps)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[1], 0.5 * x0[1] + math.sqrt(0.75) * eps[1])
