"""mmsegmentation's ADE20K training pipeline (hpc_mim/data/seg_transforms.py) and its
PhotoMetricDistortion (hpc_mim/data/photometric.py) against transcriptions of mmseg's code
(mmseg/datasets/pipelines/transforms.py, mmcv's rescale_size), fed the same random draws. The
HSV conversions are OpenCV's (what mmcv.bgr2hsv / hsv2bgr call), mmcv itself is not needed."""
import cv2
import numpy as np
import pytest
import torch

from hpc_mim.data.dense import segmentation_transform
from hpc_mim.data.photometric import PhotometricDraw, distort, draw, hsv_to_rgb, rgb_to_hsv
from hpc_mim.data.seg_transforms import crop_box, rescaled_size

MEAN, STD = [0.5] * 3, [0.25] * 3


# ------------------------------------------------------------------ mmseg, transcribed

class Replay:
    """numpy.random's randint / uniform as mmseg's PhotoMetricDistortion calls them, answering
    from a script of (method, args, value): it checks the calls and their ranges as well."""

    def __init__(self, script: list[tuple[str, tuple, float]]) -> None:
        self.script = list(script)

    def _next(self, method: str, args: tuple):
        want, want_args, value = self.script.pop(0)
        assert (method, args) == (want, want_args), f"mmseg drew {method}{args}, script has {want}{want_args}"
        return value

    def randint(self, *args):
        return self._next("randint", args)

    def uniform(self, *args):
        return self._next("uniform", args)


def script_of(d: PhotometricDraw) -> list[tuple[str, tuple, float]]:
    """The numpy draws mmseg's __call__ makes, in its order, that give the distortion ``d``."""
    def step(value, method, args):
        return [("randint", (2,), int(value is not None))] + ([(method, args, value)] if value is not None else [])
    contrast = step(d.contrast, "uniform", (0.5, 1.5))
    return [*step(d.brightness, "uniform", (-32, 32)), ("randint", (2,), int(d.contrast_first)),
            *(contrast if d.contrast_first else []), *step(d.saturation, "uniform", (0.5, 1.5)),
            *step(d.hue, "randint", (-18, 18)), *([] if d.contrast_first else contrast)]


class MMSegPhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion (defaults), on a BGR uint8 (H, W, 3) image, ``random``
    standing for numpy.random; mmcv.bgr2hsv / hsv2bgr are cv2.cvtColor."""
    brightness_delta, contrast_lower, contrast_upper = 32, 0.5, 1.5
    saturation_lower, saturation_upper, hue_delta = 0.5, 1.5, 18

    def __init__(self, random) -> None:
        self.random = random

    def convert(self, img, alpha=1, beta=0):
        img = img.astype(np.float32) * alpha + beta
        img = np.clip(img, 0, 255)
        return img.astype(np.uint8)

    def brightness(self, img):
        if self.random.randint(2):
            return self.convert(img, beta=self.random.uniform(-self.brightness_delta, self.brightness_delta))
        return img

    def contrast(self, img):
        if self.random.randint(2):
            return self.convert(img, alpha=self.random.uniform(self.contrast_lower, self.contrast_upper))
        return img

    def saturation(self, img):
        if self.random.randint(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 1] = self.convert(img[:, :, 1], alpha=self.random.uniform(self.saturation_lower,
                                                                                 self.saturation_upper))
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        return img

    def hue(self, img):
        if self.random.randint(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 0] = (img[:, :, 0].astype(int) + self.random.randint(-self.hue_delta, self.hue_delta)) % 180
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        return img

    def __call__(self, img):
        img = self.brightness(img)
        mode = self.random.randint(2)
        if mode == 1:
            img = self.contrast(img)
        img = self.saturation(img)
        img = self.hue(img)
        if mode == 0:
            img = self.contrast(img)
        return img


def mmseg_crop_bbox(label: np.ndarray, crop: int, cat_max_ratio: float, randint) -> tuple[int, int, int, int]:
    """mmseg's RandomCrop.get_crop_bbox and the cat_max_ratio loop of its __call__
    (np.random.randint(0, margin + 1) -> ``randint``), returning (y1, y2, x1, x2)."""
    def get_crop_bbox():
        margin_h, margin_w = max(label.shape[0] - crop, 0), max(label.shape[1] - crop, 0)
        offset_h, offset_w = randint(0, margin_h + 1), randint(0, margin_w + 1)
        return offset_h, offset_h + crop, offset_w, offset_w + crop

    crop_bbox = get_crop_bbox()
    if cat_max_ratio < 1.:
        for _ in range(10):
            y1, y2, x1, x2 = crop_bbox
            labels, cnt = np.unique(label[y1:y2, x1:x2], return_counts=True)
            cnt = cnt[labels != 255]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
                break
            crop_bbox = get_crop_bbox()
    return crop_bbox


def sample_image() -> torch.Tensor:
    """uint8 RGB (3, 64, 64): random colours, a grey ramp (S = 0) and saturated corners."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)
    image[:, :8] = torch.arange(64, dtype=torch.uint8).mul(4)[None, None, :]
    image[:, -4:, -4:] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]
    return image


DRAWS = [PhotometricDraw(10.7, True, None, None, None), PhotometricDraw(None, False, 1.37, None, None),
         PhotometricDraw(None, True, None, 0.61, None), PhotometricDraw(None, False, None, 1.45, None),
         PhotometricDraw(None, True, None, None, -18), PhotometricDraw(None, False, None, None, 17),
         PhotometricDraw(-31.2, True, 0.52, 1.3, 5), PhotometricDraw(25.0, False, 1.49, 0.7, -9),
         PhotometricDraw(None, False, None, None, None)]


@pytest.mark.parametrize("d", DRAWS + [None] * 6)
def test_photometric_distortion_is_mmsegs_on_the_same_draws(d):
    if d is None:                                         # draws from the seeded generator
        d = draw()
    image = sample_image()
    mine = distort(image, d)
    bgr = np.ascontiguousarray(image.permute(1, 2, 0).numpy()[..., ::-1])
    ref = MMSegPhotoMetricDistortion(Replay(script_of(d)))(bgr)[..., ::-1]
    # exact: OpenCV's vectorised HSV -> RGB (with the FMA contraction of x86-64 / arm64 builds)
    np.testing.assert_array_equal(mine.permute(1, 2, 0).numpy(), ref, err_msg=str(d))


def test_hsv_conversions_are_opencvs_8_bit_ones():
    g = torch.Generator().manual_seed(1)
    rgb = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=g)
    rgb[:, 0] = torch.arange(128, dtype=torch.uint8)[None, :] * 2            # greys: S = 0, H = 0
    hsv = rgb_to_hsv(rgb)
    ref = cv2.cvtColor(np.ascontiguousarray(rgb.permute(1, 2, 0).numpy()), cv2.COLOR_RGB2HSV)
    np.testing.assert_array_equal(hsv.permute(1, 2, 0).numpy(), ref)
    hsv = torch.stack([torch.randint(0, 180, (128, 128), generator=g),
                       *torch.randint(0, 256, (2, 128, 128), generator=g)]).to(torch.uint8)
    ref = cv2.cvtColor(np.ascontiguousarray(hsv.permute(1, 2, 0).numpy()), cv2.COLOR_HSV2RGB)
    np.testing.assert_array_equal(hsv_to_rgb(hsv).permute(1, 2, 0).numpy(), ref)


def test_photometric_draws_have_mmsegs_probabilities_and_ranges():
    torch.manual_seed(0)
    draws = [draw() for _ in range(4000)]
    for name in ("brightness", "contrast", "saturation", "hue"):
        applied = [getattr(d, name) for d in draws if getattr(d, name) is not None]
        assert abs(len(applied) / len(draws) - 0.5) < 0.04, name             # each with p 0.5
    assert abs(np.mean([d.contrast_first for d in draws]) - 0.5) < 0.04
    b = [d.brightness for d in draws if d.brightness is not None]
    c = [x for d in draws for x in (d.contrast, d.saturation) if x is not None]
    hues = {d.hue for d in draws if d.hue is not None}
    assert -32 <= min(b) < -31 and 31 < max(b) < 32
    assert 0.5 <= min(c) < 0.51 and 1.49 < max(c) < 1.5
    assert hues == set(range(-18, 18))                  # numpy's randint(-18, 18): 18 excluded


# ------------------------------------------------------------------ resize, crop, pad

def test_rescale_is_mmcvs_keep_ratio_rescale_within_long_and_short_bounds():
    # mmcv rescale_size: f = min(long / max(h, w), short / min(h, w)), sizes int(x * f + 0.5)
    assert rescaled_size(512, 683, 2048, 512) == (512, 683)
    assert rescaled_size(300, 1500, 2048, 512) == (410, 2048)              # 5:1: the long side binds
    assert rescaled_size(100, 50, 2048, 512) == (1024, 512)
    assert rescaled_size(333, 500, 1024, 256) == (256, 384)
    # evaluation: the (4 x scale, scale) bounds of mmseg's Resize((2048, 512), keep_ratio=True)
    image, label = torch.zeros(3, 30, 150, dtype=torch.uint8), torch.zeros(30, 150, dtype=torch.uint8)
    x, y = segmentation_transform(False, 16, 16, MEAN, STD)(image, label)
    assert x.shape == (3, 13, 64) and y.shape == (30, 150)


def test_crop_redraws_as_mmsegs_random_crop_with_cat_max_ratio():
    label = np.zeros((64, 96), dtype=np.uint8)                    # mostly class 0
    label[40:56, 60:90] = 1
    label[:, :10] = 255                                           # ignored: not counted
    tries = []
    for seed in range(40):
        torch.manual_seed(seed)
        mine = crop_box(torch.from_numpy(label), 32, 0.75, 255)
        torch.manual_seed(seed)
        drawn = []

        def randint(low, high, drawn=drawn):
            drawn.append(1)
            return int(torch.randint(low, high, ()))
        assert mine == mmseg_crop_bbox(label, 32, 0.75, randint), seed
        tries.append(len(drawn) // 2)
    assert min(tries) == 1 and max(tries) == 11 and any(1 < t < 11 for t in tries)
    torch.manual_seed(0)                                          # ratio 1: the first box, no redraw
    first = crop_box(torch.from_numpy(label), 32, 1.0, 255)
    torch.manual_seed(0)
    assert first == mmseg_crop_bbox(label, 32, 1.0, lambda a, b: int(torch.randint(a, b, ())))


def test_training_crops_are_padded_at_the_bottom_right_after_normalisation():
    g = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g)
    label = torch.randint(0, 4, (16, 16), dtype=torch.uint8, generator=g)
    transform = segmentation_transform(True, 8, 32, MEAN, STD)   # short side 4-16 < 32: padded
    for seed in range(5):
        torch.manual_seed(seed)
        x, y = transform(image, label)
        assert x.shape == (3, 32, 32) and y.shape == (32, 32)
        valid = y != 255
        h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
        assert 4 <= h <= 16 and valid[:h, :w].all() and not valid[h:].any() and not valid[:, w:].any()
        assert (x[:, h:] == 0).all() and (x[:, :, w:] == 0).all()      # the mean colour, not black


def test_training_pipeline_distorts_colours_after_the_geometry():
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=g)
    label = torch.randint(0, 4, (48, 64), dtype=torch.uint8, generator=g)
    for seed in range(4):
        torch.manual_seed(seed)
        plain, y_plain = segmentation_transform(True, 32, 32, MEAN, STD, photometric=False)(image, label)
        d = draw()                                  # the draw that follows the geometric ones
        torch.manual_seed(seed)
        x, y = segmentation_transform(True, 32, 32, MEAN, STD)(image, label)      # default: on
        assert torch.equal(y, y_plain)
        valid = y != 255
        h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
        u8 = ((plain[:, :h, :w] * 0.25 + 0.5) * 255).round().to(torch.uint8)
        want = (distort(u8, d).float() / 255 - 0.5) / 0.25
        torch.testing.assert_close(x[:, :h, :w], want, atol=1e-5, rtol=0)
