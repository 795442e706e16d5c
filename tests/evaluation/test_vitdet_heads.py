"""ViTDet's Mask R-CNN heads (evaluation/vitdet_heads.py) against detectron2's definitions:
mask_rcnn_vitdet.py (RPN conv_dims [-1, -1], box head 4 conv + 1 fc with "LN", mask head "LN"),
box_head.py FastRCNNConvFCHead, mask_head.py MaskRCNNConvUpsampleHead, layers LayerNorm; its
ROIAlignV2 pooling (poolers.py) and L1 box losses (evaluation/vitdet_losses.py: rpn.py,
fast_rcnn.py), each option giving back torchvision's numbers."""
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign, roi_align

from evaluation import vitdet_heads as heads
from evaluation.detection import Detector
from hpc_mim.config import load_config
from hpc_mim.config_error import ConfigError
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


# --- RoI pooling and box losses: detectron2's ROIAlignV2 (modeling/poolers.py ROIPooler) and L1
# losses (proposal_generator/rpn.py RPN.losses, roi_heads/fast_rcnn.py box_reg_loss) -------------

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]                 # ViTDet-B/16: strides 4-32, levels 2-5


def d2_levels(boxes, min_level, max_level):
    """detectron2 modeling/poolers.py ``assign_boxes_to_levels`` (canonical 224 px, level 4)."""
    size = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    level = torch.floor(4 + torch.log2(size / 224 + 1e-8))
    return level.clamp(min_level, max_level).long() - min_level


def pyramid_and_boxes():
    """Maps of a 1024 px padded batch of 2 and 40 boxes per image, sides 8-900 px (every level)."""
    torch.manual_seed(0)
    maps = OrderedDict((str(i), torch.randn(2, 3, 256 >> i, 256 >> i)) for i in range(4))
    xy = torch.rand(2, 40, 2) * 100
    wh = torch.empty(2, 40, 2).uniform_(math.log(8), math.log(900)).exp()
    return maps, list(torch.cat([xy, xy + wh], -1))


def test_roi_pool_is_detectron2s_roialignv2_at_the_pyramids_scales():
    maps, boxes = pyramid_and_boxes()
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    levels = d2_levels(torch.cat(boxes), 2, 5)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    for size in (7, 14):
        ref = torch.cat([roi_align(maps[str(lv)], rois[i:i + 1], size, SCALES[lv], sampling_ratio=0, aligned=True)
                         for i, lv in enumerate(levels.tolist())])
        # unpadded image sizes well below the padded 1024: the scales are the pyramid's, whatever
        # the batch (torchvision's MultiScaleRoIAlign would infer 2x too large ones from these)
        out = heads.roi_pool("v2", size, SCALES)(maps, boxes, [(600, 500), (400, 700)])
        assert torch.allclose(out, ref, atol=1e-6)
        # the reference tells ROIAlignV2 from torchvision's pooling, even at the right scales
        tv = MultiScaleRoIAlign(["0", "1", "2", "3"], size, 2)(maps, boxes, [(1024, 1024)])
        assert not torch.allclose(tv, ref, atol=1e-3)


def test_roi_align_v1_restores_torchvisions_pooling():
    maps, boxes = pyramid_and_boxes()
    tv = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(maps, boxes, [(1024, 1024)])
    assert torch.equal(heads.roi_pool("v1", 7, SCALES)(maps, boxes, [(600, 500), (400, 700)]), tv)


def test_the_detector_pools_with_roialignv2_unless_told_v1():
    # smoke: patch 4, scale_factors [2, 1, 0.5, 0.25] -> strides 2-16
    for kind, aligned, sampling in (("v2", True, 0), ("v1", False, 2)):
        rh = small_detector(roi_align=kind).rcnn.roi_heads
        for pool, size in ((rh.box_roi_pool, 7), (rh.mask_roi_pool, 14)):
            assert (pool.aligned, pool.sampling_ratio, pool.output_size) == (aligned, sampling, (size, size))
            assert pool.scales == [0.5, 0.25, 0.125, 0.0625]
            assert (pool.map_levels.k_min, pool.map_levels.k_max) == (1, 4)


def smooth_l1(x, beta=1 / 9):
    return torch.where(x.abs() < beta, 0.5 * x ** 2 / beta, x.abs() - 0.5 * beta)


def bce(logit, y):
    return torch.nn.functional.softplus(logit) - y * logit           # -log sigmoid(+-logit)


def test_rpn_losses_are_detectron2s_l1_over_256_anchors_per_image():
    # 2 images x 6 anchors: image 0 has 2 positives and 2 negatives, image 1 one of each (the rest
    # ignored, -1): all 6 are sampled (fewer than 128 positives / 256 per image)
    labels = [torch.tensor([1., 0, -1, 1, 0, -1]), torch.tensor([0., -1, 1, -1, -1, -1])]
    torch.manual_seed(0)
    objectness, deltas = torch.randn(12, 1) * 2, torch.randn(12, 4)
    targets = [torch.randn(6, 4), torch.randn(6, 4)]
    y, t = torch.cat(labels), torch.cat(targets)
    pos, sampled = y == 1, y >= 0
    diff = deltas[pos] - t[pos]
    # detectron2: sums over the sampled anchors / (256 x 2 images)
    expected = (bce(objectness[sampled, 0], y[sampled]).sum() / 512, diff.abs().sum() / 512)
    got = small_detector().rcnn.rpn.compute_loss(objectness, deltas, labels, targets)
    assert torch.allclose(torch.stack(got), torch.stack(expected), rtol=1e-5)
    # torchvision (box_loss: smooth_l1): smooth L1 beta 1/9 summed / 6 sampled, mean cross-entropy
    tv = (bce(objectness[sampled, 0], y[sampled]).mean(), smooth_l1(diff).sum() / 6)
    got = small_detector(box_loss="smooth_l1").rcnn.rpn.compute_loss(objectness, deltas, labels, targets)
    assert torch.allclose(torch.stack(got), torch.stack(tv), rtol=1e-5)
    assert not torch.allclose(tv[1], expected[1], rtol=0.1)


def test_fast_rcnn_box_loss_is_detectron2s_l1_over_the_sampled_rois():
    torch.manual_seed(0)
    maps = OrderedDict((str(i), torch.randn(1, 16, 32 >> i, 32 >> i)) for i in range(4))   # 64 px, fpn 16
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 6:40, 4:30] = masks[1, 10:50, 20:60] = 1
    targets = [{"boxes": torch.tensor([[4., 6, 30, 40], [20, 10, 60, 50]]), "labels": torch.tensor([3, 7]),
                "masks": masks}]
    # with the 2 ground-truth boxes torchvision adds, 7 RoIs: all sampled (32 per image, 8 positive)
    proposals = [torch.tensor([[5., 5, 31, 42], [18, 12, 58, 47], [40, 40, 60, 60], [0, 0, 10, 10],
                               [6, 8, 26, 36]])]
    results = {}
    for box_loss in ("l1", "smooth_l1"):       # l1 first: the other model must keep torchvision's
        rh = small_detector(box_loss=box_loss).rcnn.roi_heads.train()
        losses = rh(maps, proposals, [(64, 64)], targets)[1]
        rois, _, labels, reg = rh.select_training_samples(proposals, targets)
        logits, deltas = rh.box_predictor(rh.box_head(rh.box_roi_pool(maps, rois, [(64, 64)])))
        y, t = torch.cat(labels), torch.cat(reg)
        assert len(y) == 7 and (y > 0).sum() >= 3
        diff = deltas.reshape(7, -1, 4)[y > 0, y[y > 0]] - t[y > 0]
        results[box_loss] = diff.abs().sum() / 7 if box_loss == "l1" else smooth_l1(diff).sum() / 7
        assert torch.allclose(losses["loss_box_reg"], results[box_loss], rtol=1e-5)
        assert torch.allclose(losses["loss_classifier"], torch.nn.functional.cross_entropy(logits, y))
        assert {"loss_mask"} < set(losses)
    assert not torch.allclose(results["l1"], results["smooth_l1"], rtol=0.1)


def test_box_loss_and_roi_align_accept_only_known_names():
    for key in ("box_loss", "roi_align"):
        s = load_config("mae", "smoke").eval.detection
        setattr(s, key, "v3")
        with pytest.raises(ConfigError, match=f"eval.detection.{key}"):
            s.validate()
