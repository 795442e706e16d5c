"""ViTDet's large-scale jitter (hpc_mim/data/lsj.py) against detectron2's ResizeScale +
FixedSizeCrop(pad=False) formulas (detectron2/data/transforms/augmentation_impl.py)."""
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from hpc_mim.data.dense import SeededSamples
from hpc_mim.data.lsj import LargeScaleJitter, mask_boxes


def reference_draw(h, w, size, lo, hi, gen_state):
    """detectron2's ResizeScale._get_resize and FixedSizeCrop._get_crop, drawing s then u."""
    torch.set_rng_state(gen_state)
    s = lo + (hi - lo) * float(torch.rand(()))
    scale = min(size * s / h, size * s / w)
    oh, ow = round(h * scale), round(w * scale)
    u = float(torch.rand(()))
    off = (round(max(oh - size, 0) * u), round(max(ow - size, 0) * u))
    return s, (oh, ow), off, (min(size, oh), min(size, ow))


def sample(h=40, w=60, boxes=((10, 5, 30, 25), (50, 30, 60, 40))):
    image = tv_tensors.Image(torch.randint(0, 255, (3, h, w), dtype=torch.uint8))
    masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        masks[k, y1:y2, x1:x2] = 1
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes), format="XYXY", canvas_size=(h, w)),
              "labels": torch.arange(1, len(boxes) + 1), "masks": tv_tensors.Mask(masks)}
    return image, target


@pytest.mark.parametrize("seed", range(6))
def test_sizes_and_crop_follow_resize_scale_and_fixed_size_crop(seed):
    torch.manual_seed(seed)
    lsj = LargeScaleJitter(64, 0.1, 2.0)
    image, target = sample()
    state = torch.get_rng_state()
    out, t = lsj(image, {k: v for k, v in target.items() if k != "masks"})
    s, (oh, ow), (top, left), (ch, cw) = reference_draw(40, 60, 64, 0.1, 2.0, state)
    assert 0.1 <= s <= 2.0
    assert out.shape == (3, ch, cw) and max(ch, cw) <= 64
    assert max(oh, ow) == round(64 * s)              # the longer side fits the jittered square
    # boxes: scaled by the output / input ratio per axis, shifted by the crop, clipped to it
    rx, ry = ow / 60, oh / 40
    expected = (torch.tensor([[10, 5, 30, 25], [50, 30, 60, 40]]) * torch.tensor([rx, ry, rx, ry])
                - torch.tensor([left, top, left, top])).clamp(min=0)
    expected = torch.minimum(expected, torch.tensor([cw, ch, cw, ch]))
    keep = ((expected[:, 2:] - expected[:, :2]) > 1e-5).all(1)
    assert torch.allclose(t["boxes"].as_subclass(torch.Tensor), expected[keep].float(), atol=1e-5)
    assert t["labels"].tolist() == torch.arange(1, 3)[keep].tolist()
    assert t["boxes"].canvas_size == (ch, cw)


def test_scale_range_and_one_crop_draw_for_both_axes():
    lsj = LargeScaleJitter(100, 0.1, 2.0)
    torch.manual_seed(0)
    sizes = [lsj.draw(50, 50) for _ in range(400)]
    sides = torch.tensor([oh for (oh, _), _ in sizes], dtype=torch.float32)
    assert sides.min() >= 10 and sides.max() <= 200 and sides.min() < 20 and sides.max() > 190
    for (oh, _), (top, left, ch, cw) in sizes:
        if oh > 100:                                  # square: the same u puts the crop on the diagonal
            assert top == left and ch == cw == 100 and 0 <= top <= oh - 100


def test_boxes_are_recomputed_from_the_masks_and_empty_instances_dropped():
    torch.manual_seed(3)
    lsj = LargeScaleJitter(32, 2.0, 2.0)             # 40 x 60 -> 43 x 64, a 32 x 32 crop
    image, target = sample()
    state = torch.get_rng_state()
    out, t = lsj(image, target)
    _, (oh, ow), (top, left), (ch, cw) = reference_draw(40, 60, 32, 2.0, 2.0, state)
    assert t["masks"].shape[1:] == (ch, cw) == tuple(out.shape[1:])
    # the crop window of the resized image (bilinear, antialiased as PIL's)
    assert torch.equal(out, F.resize(image, [oh, ow], antialias=True)[:, top:top + ch, left:left + cw])
    assert torch.equal(t["boxes"].as_subclass(torch.Tensor), mask_boxes(t["masks"]))
    assert (t["masks"].flatten(1).sum(1) > 0).all()   # instances cropped away are gone
    assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"]) >= 1


def test_mask_boxes_are_detectron2_bitmask_boxes():
    masks = torch.zeros(3, 8, 10, dtype=torch.uint8)
    masks[0, 2:5, 3:7] = 1
    masks[1, 7, 9] = 1
    expected = torch.tensor([[3, 2, 7, 5], [9, 7, 10, 8], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(mask_boxes(masks), expected)


def test_seeded_samples_reproduce_the_jitter_and_flip():
    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            from torchvision.transforms import v2
            image, target = sample()
            return v2.Compose([v2.RandomHorizontalFlip(), LargeScaleJitter(64)])(image, target)

    samples = SeededSamples(Pairs(), seed=7)
    a, b = samples[(0, 1)], samples[(0, 1)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    shapes = {tuple(samples[(e, 1)][0].shape) for e in range(8)}
    assert len(shapes) > 1                            # another epoch, another jitter
