import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator

from data_prep.scenes import generate
from evaluation.dense_heads import SimpleFeaturePyramid
from evaluation.detection import DetectionTask, Detector, coco_metrics, to_coco_results
from hpc_mim.config import load_config
from hpc_mim.data.dense import SeededSamples, coco_detection, coco_of, collate_pairs, has_masks, num_categories
from hpc_mim.distributed.env import free_port
from hpc_mim.models.vit import ViTEncoder

SOURCE = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    generate(__import__("pathlib").Path(SOURCE), out, train=12, val=6)
    return out


def test_coco_writer_output_loads_in_pycocotools_and_perfect_predictions_score_ap_1(scenes):
    coco = COCO(str(scenes / "coco" / "annotations" / "instances_val2017.json"))
    assert len(coco.getImgIds()) == 6 and sorted(coco.getCatIds()) == list(range(1, 11))
    results = []
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        output = {"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
                  "labels": torch.tensor([a["category_id"] for a in anns]),
                  "scores": torch.ones(len(anns)),
                  "masks": torch.stack([torch.from_numpy(coco.annToMask(a)).float()[None] for a in anns])}
        results += to_coco_results(image_id, output)
    polygons = [a["segmentation"] for a in coco.loadAnns(coco.getAnnIds())]
    m = coco_metrics(coco, results, ["bbox", "segm"])
    assert m["box_ap"] == pytest.approx(100.0) and m["mask_ap"] == pytest.approx(100.0)
    # the ground truth is left as it was (COCOeval converts polygons in place)
    assert [a["segmentation"] for a in coco.loadAnns(coco.getAnnIds())] == polygons
    # shifting every box by half its size must cost AP: the metric really compares
    for r in results:
        r["bbox"][0] += r["bbox"][2] / 2
    assert coco_metrics(coco, results, ["bbox"])["box_ap"] < 50.0
    assert coco_metrics(coco, [], ["bbox"])["box_ap"] == 0.0


def test_coco_instances_agree_with_the_ade20k_maps_of_the_same_scenes(scenes):
    from PIL import Image
    coco = COCO(str(scenes / "coco" / "annotations" / "instances_train2017.json"))
    for image_id in coco.getImgIds():
        semantic = np.array(Image.open(scenes / "ade20k" / "annotations" / "training" / f"scene_{image_id:08d}.png"))
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            mask = coco.annToMask(ann).astype(bool)
            # the visible part of item class c is labelled c + 2 in ADE20K, category c + 1 in COCO
            # (the polygon also covers the holes of a bag's handle, hence not all of it)
            assert (semantic[mask] == ann["category_id"] + 1).mean() > 0.8
            assert (semantic[mask] == ann["category_id"] + 1).sum() >= ann["area"] * 0.95


def test_coco_loader_gives_boxes_masks_and_labels(scenes):
    ds = coco_detection(scenes / "coco", "train", train=True)
    assert has_masks(coco_of(ds)) and num_categories(coco_of(ds)) == 11
    images, targets = collate_pairs([ds[0], ds[1]])
    t = targets[0]
    assert images[0].shape == (3, 64, 64) and images[0].dtype == torch.float32
    assert t["boxes"].shape[1] == 4 and t["masks"].shape[1:] == (64, 64)
    assert len(t["labels"]) == len(t["boxes"]) == len(t["masks"]) >= 1
    assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()


def test_lsj_training_set_is_jittered_and_reproducible_per_sample_key(scenes):
    """The COCO reader with ViTDet's large-scale jitter (64 px target): images at most 64 px,
    sizes varying with the draw, float boxes inside the image, the same sample for the same
    (seed, epoch, index) key (exact resume)."""
    samples = SeededSamples(coco_detection(scenes / "coco", "train", train=True, lsj=(64, 0.1, 2.0)), 0)
    first = [samples[(e, 0)] for e in range(6)]
    assert len({tuple(im.shape) for im, _ in first}) > 1
    for image, t in first:
        h, w = image.shape[-2:]
        assert max(h, w) <= 64 and image.dtype == torch.float32
        boxes = t["boxes"].as_subclass(torch.Tensor)
        assert boxes.dtype == torch.float32 and (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all() and t["masks"].shape[1:] == (h, w)
    again = samples[(3, 0)]
    assert torch.equal(again[0], first[3][0]) and torch.equal(again[1]["boxes"], first[3][1]["boxes"])


def test_simple_feature_pyramid_levels_and_shapes():
    # ViTDet's factors on a ViT-B/16 at 512 px (32 x 32 tokens): strides 4, 8, 16, 32 and 64
    fpn = SimpleFeaturePyramid(dim=32, out_channels=24, factors=(4, 2, 1, 0.5))
    feats = fpn(torch.randn(2, 32, 32, 32))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape) for f in feats.values()] == [
        (2, 24, 128, 128), (2, 24, 64, 64), (2, 24, 32, 32), (2, 24, 16, 16), (2, 24, 8, 8)]
    small = SimpleFeaturePyramid(dim=32, out_channels=24, factors=(2, 1, 0.5, 0.25))
    assert [f.shape[-1] for f in small(torch.randn(1, 32, 16, 16)).values()] == [32, 16, 8, 4, 2]


def smoke_train_set(scenes, s):
    """The training set as ``body`` builds it for the config ``s`` (with its LSJ)."""
    return coco_detection(scenes / "coco", "train", train=True,
                          lsj=(s.image_size, *s.lsj_scale) if s.lsj else None)


def test_mask_rcnn_on_the_vit_trains_and_predicts(scenes):
    torch.manual_seed(0)             # LSJ draws from the global generator (SeededSamples seeds it in training)
    s = load_config("mae", "smoke").eval.detection
    ds = smoke_train_set(scenes, s)
    enc = ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model = Detector(enc, 11, s, [0.5] * 3, [0.25] * 3, masks=True)
    images, targets = collate_pairs([ds[i] for i in range(2)])
    losses = model(images, [{k: v for k, v in t.items() if k != "image_id"} for t in targets])
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(losses)
    sum(losses.values()).backward()
    assert enc.blocks[0].attn.qkv.weight.grad.abs().sum() > 0    # gradients reach the encoder
    model.eval()
    with torch.no_grad():
        out = model(images)
    # masks at the input's size: LSJ's crop is not padded (ViTDet's pad=False), so a jittered
    # image may be smaller than image_size
    assert out[0]["masks"].shape[1:] == (1, *images[0].shape[-2:]) and out[0]["boxes"].shape[1] == 4


def small_detector() -> Detector:
    s = load_config("mae", "smoke").eval.detection
    enc = ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    return Detector(enc, 11, s, [0.5] * 3, [0.25] * 3, masks=True)


def test_under_bf16_autocast_only_the_backbone_is_bf16(scenes):
    """bf16 has 8 bits of mantissa: boxes at 512-1024 px would sit on a 4-8 px grid. Under the
    loop's bf16 autocast the ViT runs in bf16, and anchors, proposals, losses and boxes in fp32."""
    torch.manual_seed(0)
    model = small_detector()
    ds = smoke_train_set(scenes, load_config("mae", "smoke").eval.detection)
    images, targets = collate_pairs([ds[i] for i in range(2)])
    targets = [{k: v for k, v in t.items() if k != "image_id"} for t in targets]
    seen: dict[str, list[torch.dtype]] = {"qkv": [], "anchors": [], "proposals": []}
    model.rcnn.backbone.encoder.blocks[0].attn.qkv.register_forward_hook(
        lambda m, i, o: seen["qkv"].append(o.dtype))
    model.rcnn.rpn.register_forward_hook(
        lambda m, i, o: seen["proposals"].extend(p.dtype for p in o[0]))
    original = AnchorGenerator.forward

    def anchors(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen["anchors"].extend(a.dtype for a in out)
        return out

    AnchorGenerator.forward = anchors
    try:
        with torch.autocast("cpu", torch.bfloat16):
            losses = model(images, targets)
            sum(losses.values()).backward()
            model.eval()
            with torch.no_grad():
                out = model(images)
    finally:
        AnchorGenerator.forward = original
    assert seen["qkv"] == [torch.bfloat16] * 2                  # the backbone follows autocast
    assert set(seen["anchors"]) == set(seen["proposals"]) == {torch.float32}
    assert len(seen["anchors"]) == len(seen["proposals"]) == 4  # 2 images, train and eval
    assert {k: v.dtype for k, v in losses.items()} == dict.fromkeys(losses, torch.float32)
    assert model.rcnn.backbone.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    boxes = torch.cat([o["boxes"] for o in out])
    assert len(boxes) > 10 and boxes.dtype == out[0]["scores"].dtype == torch.float32
    # computed in fp32: most coordinates are not on bf16's grid (steps of 0.25 at 32-64 px)
    assert (boxes != boxes.bfloat16().float()).float().mean() > 0.5


# ------------------------------------------------------------------ evaluation over two ranks

class GroundTruthModel(nn.Module):
    """Predicts each validation image's own annotations (recognised by its pixels), with the
    boxes of odd image ids shifted by half their size: an AP between 0 and 100 that depends on
    every image's results."""

    def __init__(self, val_set) -> None:
        super().__init__()
        self.targets = {image.numpy().tobytes(): target for image, target in val_set}

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            t = self.targets[image.numpy().tobytes()]
            boxes = t["boxes"].as_subclass(torch.Tensor).float()        # a tv_tensor, whole pixels
            if t["image_id"] % 2:
                boxes += (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2) / 2
            outputs.append({"boxes": boxes, "labels": t["labels"], "scores": torch.ones(len(boxes)),
                            "masks": t["masks"].as_subclass(torch.Tensor)[:, None].float()})
        return outputs


def detection_task(root, rank: int, world: int) -> tuple[DetectionTask, nn.Module]:
    s = load_config("mae", "smoke").eval.detection
    ctx = SimpleNamespace(section=s, device=torch.device("cpu"), info={"mean": [0.5] * 3, "std": [0.25] * 3},
                          proc=SimpleNamespace(env=SimpleNamespace(rank=rank, world_size=world)),
                          cfg=SimpleNamespace(train=SimpleNamespace(seed=0), data=SimpleNamespace(num_workers=0)))
    train_set = coco_detection(root / "coco", "train", train=True)
    val_set = coco_detection(root / "coco", "val", train=False)
    enc = ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    return DetectionTask(ctx, enc, train_set, val_set, masks=True), GroundTruthModel(val_set)


def evaluation_worker(rank: int, port: int, root, out: dict) -> None:
    import evaluation.detection as detection
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    scored = []
    original = detection.coco_metrics

    def counted(coco, results, iou_types, image_ids=None):
        scored.append(sorted(image_ids))
        return original(coco, results, iou_types, image_ids)

    detection.coco_metrics = counted
    task, model = detection_task(root, rank, 2)
    out[rank] = (task.evaluate(model), scored)
    dist.destroy_process_group()


def test_rank_0_alone_scores_every_image_and_every_rank_gets_its_metrics(scenes):
    """COCOeval runs once, on rank 0, over the results of both ranks' shards; the metrics it
    broadcasts are those of one process evaluating every image."""
    out = mp.Manager().dict()
    mp.spawn(evaluation_worker, args=(free_port(), scenes, out), nprocs=2, join=True)
    task, model = detection_task(scenes, 0, 1)
    alone = task.evaluate(model)
    all_ids = sorted(task.coco.getImgIds())
    assert len(all_ids) == 6
    assert out[0][1] == [all_ids] and out[1][1] == []          # scored once, by rank 0
    assert out[0][0] == out[1][0] == alone
    assert alone["mask_ap"] == pytest.approx(100.0) and 10 < alone["box_ap"] < 90
