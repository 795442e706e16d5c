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


def test_rand_augment_draws_per_image_and_keeps_the_normalisation():
    from hpc_mim.data.views import rand_augment
    mean, std = [0.5] * 3, [0.25] * 3
    torch.manual_seed(0)
    raw = torch.randint(0, 256, (16, 3, 28, 28)).float() / 255
    x = (raw - 0.5) / 0.25
    same = rand_augment(x, mean, std, num_ops=0)              # no op: only the uint8 round trip
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    out = rand_augment(x, mean, std, num_ops=2, magnitude=9)
    assert out.shape == x.shape and out.dtype == torch.float32
    changed = [(out[i] - x[i]).abs().max().item() > 1e-3 for i in range(16)]
    differences = {round((out[i] - x[i]).abs().mean().item(), 4) for i in range(16)}
    assert sum(changed) >= 12 and len(differences) > 8         # each image its own ops
