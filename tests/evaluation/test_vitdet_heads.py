"""ViTDet's Mask R-CNN heads (evaluation/vitdet_heads.py) against detectron2's definitions:
mask_rcnn_vitdet.py (RPN conv_dims [-1, -1], box head 4 conv + 1 fc with "LN", mask head "LN"),
box_head.py FastRCNNConvFCHead, mask_head.py MaskRCNNConvUpsampleHead, layers LayerNorm."""
import pytest
import torch
from torch import nn

from evaluation import vitdet_heads as heads
from evaluation.detection import Detector
from hpc_mim.config import load_config
from hpc_mim.models.relpos import RelPosAttention
from hpc_mim.models.vit import ViTEncoder


def d2_layer_norm(x, weight, bias, eps=1e-6):
    """detectron2/layers/batch_norm.py LayerNorm.forward (channels of (N, C, H, W))."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return weight[:, None, None] * x + bias[:, None, None]


def convs(module):
    return [m for m in module.modules() if type(m) is nn.Conv2d]


def test_channel_layer_norm_is_detectron2s_ln():
    norm = heads.ChannelLayerNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 5, 5) * 3 + 1
    assert torch.allclose(norm(x), d2_layer_norm(x, norm.weight, norm.bias), atol=1e-5)


def test_rpn_head_has_two_convs_with_bias_and_relu():
    head = heads.rpn_head("vitdet", 16, 3)
    c = convs(head)
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in c] == [
        (16, 16, (3, 3)), (16, 16, (3, 3)), (16, 3, (1, 1)), (16, 12, (1, 1))]
    assert all(m.bias is not None and not m.bias.any() for m in c)
    assert sum(isinstance(m, nn.ReLU) for m in head.modules()) == 2
    assert all(abs(m.weight.std().item() - 0.01) < 0.003 for m in c[:2])        # normal(0.01)


def test_box_head_is_four_ln_convs_and_one_fc():
    torch.manual_seed(0)
    head = heads.box_head("vitdet", 32, 64)
    c = convs(head)
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.bias) for m in c] == [(32, 32, (3, 3), None)] * 4
    norms = [m for m in head.modules() if isinstance(m, heads.LayerNorm2d)]
    assert len(norms) == 4 and all(n.eps == 1e-6 and n.bias is not None for n in norms)
    fcs = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(32 * 7 * 7, 64)]
    # c2_xavier_fill: kaiming uniform a=1 -> bound sqrt(3 / fan_in); bias 0
    assert fcs[0].weight.abs().max() <= (3 / (32 * 49)) ** 0.5 and not fcs[0].bias.any()
    assert fcs[0].weight.abs().max() > 0.9 * (3 / (32 * 49)) ** 0.5
    # c2_msra_fill: std sqrt(2 / fan_out)
    assert c[0].weight.std().item() == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.1)
    # forward = detectron2's conv -> LN -> ReLU x4, flatten, fc, ReLU
    x = torch.randn(3, 32, 7, 7)
    ref = x
    for conv, norm in zip(c, norms):
        ref = torch.relu(d2_layer_norm(conv(ref), norm.weight, norm.bias))
    ref = torch.relu(fcs[0](ref.flatten(1)))
    assert torch.allclose(head(x), ref, atol=1e-5)


def test_predictors_use_detectron2s_init():
    torch.manual_seed(0)
    box = heads.box_predictor("vitdet", 256, 11)
    assert box.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert box.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert not box.cls_score.bias.any() and not box.bbox_pred.bias.any()
    mask = heads.mask_predictor("vitdet", 64, 11)
    assert mask.mask_fcn_logits.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert mask.conv5_mask.kernel_size == (2, 2) and mask.conv5_mask.stride == (2, 2)


def test_mask_head_is_four_ln_convs():
    head = heads.mask_head("vitdet", 16)
    c = convs(head)
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.bias) for m in c] == [(16, 16, (3, 3), None)] * 4
    assert sum(isinstance(m, heads.LayerNorm2d) for m in head.modules()) == 4
    assert all(m.bias is not None for m in convs(heads.mask_head("torchvision", 16)))


def small_detector(**overrides) -> Detector:
    s = load_config("mae", "smoke").eval.detection
    for k, v in overrides.items():
        setattr(s, k, v)
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    return Detector(enc, 11, s, [0.5] * 3, [0.25] * 3, masks=True)


def test_the_detector_is_built_with_vitdet_heads_and_relative_positions():
    model = small_detector()
    rcnn = model.rcnn
    assert len(rcnn.rpn.head.conv) == 2
    assert sum(isinstance(m, heads.LayerNorm2d) for m in rcnn.roi_heads.box_head.modules()) == 4
    assert sum(isinstance(m, heads.LayerNorm2d) for m in rcnn.roi_heads.mask_head.modules()) == 4
    # smoke: 64 px, patch 4 -> 16 x 16 grid, window 8, depth 2 -> global blocks [0, 1]
    attn = [b.attn for b in rcnn.backbone.encoder.blocks]
    assert all(isinstance(a, RelPosAttention) and a.kind == "decomposed" for a in attn)
    assert [a.rel_pos_h.shape[0] for a in attn] == [31, 31]
    assert rcnn.transform.size_divisible == 64 and rcnn.transform._skip_resize   # square pad, LSJ
    old = small_detector(heads="torchvision", rel_pos=False, lsj=False)
    assert len(old.rcnn.rpn.head.conv) == 1 and not old.rcnn.transform._skip_resize
    assert not isinstance(old.rcnn.backbone.encoder.blocks[0].attn, RelPosAttention)


def test_zero_relative_positions_leave_the_backbone_unchanged():
    with_rel, without = small_detector(), small_detector(rel_pos=False)
    without.load_state_dict(with_rel.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = with_rel.rcnn.backbone(x), without.rcnn.backbone(x)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
