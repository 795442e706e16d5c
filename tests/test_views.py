import pytest
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
    from hpc_mim.data.randaugment import rand_augment_uint8
    from hpc_mim.data.views import rand_augment
    mean, std = [0.5] * 3, [0.25] * 3
    torch.manual_seed(0)
    raw = torch.randint(0, 256, (16, 3, 28, 28)).float() / 255
    x = ((raw - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)   # as the loader gives it
    same = rand_augment(x, mean, std, "tv-rand-n0-m9")        # no op: only the uint8 round trip
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    assert rand_augment(x, mean, std, "") is x                 # "" disables
    as_uint8 = (raw * 255).round().to(torch.uint8)
    assert torch.equal(rand_augment_uint8(as_uint8, num_ops=0), as_uint8)
    for policy, least in (("tv-rand-n2-m9", 12), ("rand-m9-mstd0.5-inc1", 8)):   # timm: p = 0.5 per op
        out = rand_augment(x, mean, std, policy)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert out.is_contiguous(memory_format=torch.channels_last)   # the patch embedding's layout
        changed = [(out[i] - x[i]).abs().max().item() > 1e-3 for i in range(16)]
        differences = {round((out[i] - x[i]).abs().mean().item(), 4) for i in range(16)}
        assert sum(changed) >= least and len(differences) > 6     # each image its own ops
    torch.manual_seed(1)
    plain = rand_augment_uint8(as_uint8, num_ops=2, magnitude=9)
    torch.manual_seed(1)
    with torch.autocast("cpu", torch.bfloat16):                # a caller's autocast changes nothing
        assert torch.equal(rand_augment_uint8(as_uint8, num_ops=2, magnitude=9), plain)


# ------------------------------------------------------------------ batched RandAugment

def _test_images(b: int, h: int, w: int) -> torch.Tensor:
    """uint8 (b, 3, h, w): noise, plus the cases with their own branches in torchvision's ops
    (a flat image: autocontrast and equalize leave it; a flat channel; a low-contrast image;
    a smooth gradient, where geometry and sharpening are visible; only 0s and 255s)."""
    g = torch.Generator().manual_seed(b * 1000 + h * 10 + w)
    x = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)
    x[0] = 77
    x[1, 1] = 200
    x[2] = torch.randint(100, 121, (3, h, w), dtype=torch.uint8, generator=g)
    ramp = torch.arange(h).view(h, 1) * 3 + torch.arange(w).view(1, w) * 5
    x[3] = torch.stack([ramp, ramp.flip(0), ramp.flip(1)]).clamp(0, 255).to(torch.uint8)
    x[4] = (x[4] > 127).to(torch.uint8) * 255
    return x


def _torchvision(name: str, img: torch.Tensor, value: float) -> torch.Tensor:
    """What torchvision's v2 RandAugment does to one image when it draws op ``name`` with the
    (signed) magnitude ``value``: its own dispatch to torchvision.transforms.v2.functional."""
    from torchvision.transforms.v2 import RandAugment
    augment = RandAugment()
    return augment._apply_image_or_video_transform(img, name, value, interpolation=augment.interpolation,
                                                   fill=augment._fill)


def _torchvision_value(name: str, magnitude: int, negative: bool, h: int, w: int) -> float:
    """torchvision's value for op ``name`` at bin ``magnitude`` (num_magnitude_bins=31)."""
    from torchvision.transforms.v2 import RandAugment
    table, signed = RandAugment._AUGMENTATION_SPACE[name]
    values = table(31, h, w)
    if values is None:
        return 0.0
    return float(values[magnitude]) * (-1 if signed and negative else 1)


@pytest.mark.parametrize("size", [(32, 32), (23, 37)])
@pytest.mark.parametrize("name", ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                                  "Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize",
                                  "AutoContrast", "Equalize"])
def test_each_batched_op_is_torchvisions_per_image_to_the_bit(name, size):
    """Every op on a whole batch with per-image values equals torchvision's functional op on each
    image, uint8 for uint8, geometric ones included (same inverse matrix, grid convention and
    nearest sampling: no tolerance needed on a CPU), at several magnitudes and both signs."""
    from hpc_mim.data.randaugment import TORCHVISION, apply_ops
    h, w = size
    x = _test_images(8, h, w)
    k = list(TORCHVISION).index(name)
    signs = (False, True) if TORCHVISION[name].signed else (False,)
    for magnitude in (0, 1, 9, 17, 30):
        for negative in signs:
            got = apply_ops(x, torch.full((8,), k), torch.full((8,), float(magnitude), dtype=torch.float64),
                            torch.full((8,), negative), TORCHVISION)
            value = _torchvision_value(name, magnitude, negative, h, w)
            expected = torch.stack([_torchvision(name, img, value) for img in x])
            assert got.dtype == torch.uint8
            assert torch.equal(got, expected), (name, magnitude, negative, int((got != expected).sum()))
            if magnitude == 9 and name != "Identity":
                assert not torch.equal(got, x)            # the op did something to compare


def test_rand_augment_is_torchvisions_on_each_image_with_its_own_draws():
    """The whole augmentation: each image equals torchvision's ops applied in turn with the ops
    and signs that image drew, and images draw different ones."""
    from hpc_mim.data.randaugment import TORCHVISION, rand_augment_uint8
    b, h, w = 40, 20, 20
    x = _test_images(b, h, w)
    torch.manual_seed(5)
    got = rand_augment_uint8(x, num_ops=2, magnitude=9)
    torch.manual_seed(5)                              # the same draws, in rand_augment_uint8's order
    draws = [(torch.randint(len(TORCHVISION), (b,)), torch.rand(b) <= 0.5) for _ in range(2)]
    names = list(TORCHVISION)
    for i in range(b):
        img = x[i]
        for choice, negative in draws:
            name = names[int(choice[i])]
            img = _torchvision(name, img, _torchvision_value(name, 9, bool(negative[i]), h, w))
        assert torch.equal(got[i], img), i
    pairs = {(int(c1), int(c2)) for c1, c2 in zip(draws[0][0], draws[1][0])}
    assert len(pairs) > 25 and 0 < int(draws[0][1].sum()) < b      # per-image ops and signs


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "tv-rand-n2-m9"])
def test_rand_augment_has_no_per_image_loop_and_no_host_sync(policy):
    """What the training thread runs per fine-tuning step: the same aten ops whatever the batch
    size (no per-image Python loop), none of them a host sync on a GPU (.item(), nonzero,
    boolean-mask indexing, a tensor made from Python data and copied to the device). On the
    meta device (shapes, no data) any op that needs the values on the host fails."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hpc_mim.data.views import rand_augment

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []
            self.syncs: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.ops.append(str(func))
            indices = args[1] if name in ("index", "index_put", "index_put_") else ()
            mask = any(t is not None and t.dtype == torch.bool for t in indices)
            if mask or name in ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal",
                                "lift_fresh", "lift_fresh_copy"):
                self.syncs.append(str(func))
            return func(*args, **(kwargs or {}))

    mean, std = [0.5] * 3, [0.25] * 3
    rand_augment(torch.zeros(2, 3, 16, 16), mean, std, policy)  # stats, tables, fill cached once
    runs = []
    for b in (2, 16):
        x = torch.randn(b, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        with Recorder() as recorder:
            rand_augment(x, mean, std, policy)
        assert recorder.syncs == [], recorder.syncs
        runs.append(recorder.ops)
    assert runs[0] == runs[1]
    meta = torch.empty(4, 3, 16, 16, device="meta").contiguous(memory_format=torch.channels_last)
    out = rand_augment(meta, mean, std, policy)
    assert out.device.type == "meta" and out.is_contiguous(memory_format=torch.channels_last)


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
