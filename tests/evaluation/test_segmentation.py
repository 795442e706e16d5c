import pytest
import torch
from torch import nn

from evaluation.dense_heads import UperNetHead, default_blocks, rescale
from evaluation.segmentation import Segmenter, confusion_matrix, segmentation_metrics, slide_logits
from hpc_mim.data.dense import IGNORE
from hpc_mim.models.vit import ViTEncoder


def test_miou_and_pixel_accuracy_match_a_hand_computation():
    # 3 classes; one pixel ignored; class 2 never appears in the labels but is predicted once
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 1, 1, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 2, 1, 0]])
    conf = confusion_matrix(pred, target, 3)
    # rows = truth: class 0: 2 right, 1 as class 1; class 1: 3 right, 1 as class 2
    assert conf.tolist() == [[2, 1, 0], [0, 3, 1], [0, 0, 0]]
    m = segmentation_metrics(conf)
    iou0 = 2 / (3 + 2 - 2)               # |pred 0 & true 0| / |pred 0 | true 0| = 2 / 3
    iou1 = 3 / (4 + 4 - 3)               # 3 / 5
    iou2 = 0 / (0 + 1 - 0)               # predicted once, never true: 0
    assert m["iou/0"] == pytest.approx(100 * iou0)
    assert m["iou/1"] == pytest.approx(100 * iou1)
    assert m["iou/2"] == pytest.approx(0.0)
    assert m["miou"] == pytest.approx(100 * (iou0 + iou1 + iou2) / 3)
    assert m["pixel_acc"] == pytest.approx(100 * 5 / 7)          # ignored pixel left out
    assert m["macc"] == pytest.approx(100 * (2 / 3 + 3 / 4) / 2)  # class 2 has no pixels: skipped


def test_a_class_absent_from_labels_and_predictions_is_not_averaged():
    conf = torch.tensor([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    m = segmentation_metrics(conf)
    assert m["miou"] == 100.0 and "iou/2" not in m


@pytest.mark.parametrize("size, crop, stride", [((64, 64), 32, 16), ((40, 56), 32, 21), ((20, 24), 32, 16)])
def test_sliding_windows_reproduce_a_translation_equivariant_model(size, crop, stride):
    # a 1x1 conv gives the same logits whatever the window: averaging overlaps must give them back
    model = nn.Conv2d(3, 5, 1)
    image = torch.randn(1, 3, *size)
    out = slide_logits(model, image, 5, crop, stride)
    assert out.shape == (1, 5, *size)
    torch.testing.assert_close(out, model(image), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factors, sizes", [
    ((4, 2, 1, 0.5), [(64, 64), (32, 32), (16, 16), (8, 8)]),       # ViT-B/16 at 256 px: strides 4-32
    ((2, 1, 0.5, 0.25), [(32, 32), (16, 16), (8, 8), (4, 4)]),
])
def test_block_maps_are_rescaled_by_the_pyramid_factors(factors, sizes):
    x = torch.randn(2, 8, 16, 16)                                   # a 16 x 16 token grid
    assert [tuple(rescale(8, f, nn.BatchNorm2d)(x).shape[-2:]) for f in factors] == sizes
    assert len(rescale(8, 4, nn.BatchNorm2d)) == 4                  # deconv, norm, GELU, deconv


def test_segmenter_predicts_every_pixel_and_reads_the_chosen_blocks():
    enc = ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=6, num_heads=2)
    model = Segmenter(enc, num_classes=11, channels=16, blocks=default_blocks(6)).eval()
    assert model.blocks == [1, 2, 3, 5]
    assert default_blocks(12) == [3, 5, 7, 11] and default_blocks(24) == [7, 11, 15, 23]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 11, 32, 32)   # 8x8 tokens at 32 px
    head = UperNetHead(32, 16, 11).eval()                                  # x4 .. x0.5
    assert head([torch.randn(1, 32, 8, 8)] * 4).shape == (1, 11, 32, 32)
