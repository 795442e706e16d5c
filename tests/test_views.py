import torch

from hpc_mim.data.views import finish_view, strong_color


def test_strong_color_stays_in_range_and_draws_per_sample():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 28, 28)
    y = strong_color(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    gray = (y[:, 0] == y[:, 1]).all(dim=(1, 2)) & (y[:, 1] == y[:, 2]).all(dim=(1, 2))
    assert 0 < int(gray.sum()) < 64                      # grayscale chosen for some samples only
    raw = (x * 255).to(torch.uint8)
    v = finish_view("strong_color", raw, [0.5] * 3, [0.25] * 3)
    assert v.dtype == torch.float32 and v.min() >= -2 - 1e-6 and v.max() <= 2 + 1e-6
