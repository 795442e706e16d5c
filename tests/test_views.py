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


def test_batched_hue_shift_matches_torchvision_per_image():
    from torchvision.transforms.v2 import functional as TF

    from hpc_mim.data.views import shift_hue
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 9, 9, generator=g)
    x[0] = 0.5                                   # grey: no hue
    x[1, :, :3] = 1.0                            # ties between channels
    x[2, 1] = x[2, 0]                            # red == green everywhere
    shifts = torch.linspace(-0.5, 0.5, 12)
    expected = torch.stack([TF.adjust_hue(img, float(h)) for img, h in zip(x, shifts)])
    torch.testing.assert_close(shift_hue(x, shifts), expected, atol=2e-6, rtol=0)


def test_batched_blur_matches_torchvision_per_image():
    from torchvision.transforms.v2 import functional as TF

    from hpc_mim.data.views import gaussian_blur
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 23, 23, generator=g)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    expected = torch.stack([TF.gaussian_blur(img, [5, 5], [float(s)]) for img, s in zip(x, sigmas)])
    torch.testing.assert_close(gaussian_blur(x, 5, sigmas), expected, atol=1e-6, rtol=0)


def test_strong_color_makes_no_host_sync(monkeypatch):
    """LUT's second view is built per batch on the training device: no per-sample Python loop
    fed by .tolist(), no host round trip."""
    from conftest import HostSyncs
    torch.manual_seed(0)
    raw = torch.randint(0, 256, (32, 3, 28, 28), dtype=torch.uint8)
    syncs = HostSyncs(monkeypatch.setattr)
    finish_view("strong_color", raw, [0.5] * 3, [0.25] * 3)
    assert syncs.sites == {}


def test_color_jitter_is_torchvisions_per_image_in_each_images_own_order():
    """torchvision's ColorJitter applies its four ops in a random order per call (the authors'
    view 2); each image here must equal torchvision's ops in the order and with the factors
    it drew."""
    from torchvision.transforms.v2 import functional as TF

    from hpc_mim.data.views import color_jitter
    torch.manual_seed(0)
    x = torch.rand(24, 3, 9, 9)
    torch.manual_seed(1)
    got = color_jitter(x)
    torch.manual_seed(1)                          # the same draws, in color_jitter's order
    factors = [torch.empty(24, 1, 1, 1).uniform_(1 - a, 1 + a).flatten() for a in (0.4, 0.4, 0.2)]
    hue = torch.empty(24).uniform_(-0.1, 0.1)
    order = torch.argsort(torch.rand(24, 4), dim=1)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    values = (*factors, hue)
    orders = set()
    for i in range(24):
        img = x[i]
        for k in order[i].tolist():
            img = ops[k](img, float(values[k][i]))
        torch.testing.assert_close(got[i], img, atol=1e-5, rtol=0)
        orders.add(tuple(order[i].tolist()))
    assert len(orders) > 10                       # not one fixed order
