import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from data_prep.scenes import generate
from evaluation.dense_heads import SimpleFeaturePyramid
from evaluation.detection import Detector, coco_metrics, to_coco_results
from hpc_mim.config import load_config
from hpc_mim.data.dense import coco_detection, coco_of, collate_pairs, has_masks, num_categories
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


def test_simple_feature_pyramid_levels_and_shapes():
    # ViTDet's factors on a ViT-B/16 at 512 px (32 x 32 tokens): strides 4, 8, 16, 32 and 64
    fpn = SimpleFeaturePyramid(dim=32, out_channels=24, factors=(4, 2, 1, 0.5))
    feats = fpn(torch.randn(2, 32, 32, 32))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape) for f in feats.values()] == [
        (2, 24, 128, 128), (2, 24, 64, 64), (2, 24, 32, 32), (2, 24, 16, 16), (2, 24, 8, 8)]
    small = SimpleFeaturePyramid(dim=32, out_channels=24, factors=(2, 1, 0.5, 0.25))
    assert [f.shape[-1] for f in small(torch.randn(1, 32, 16, 16)).values()] == [32, 16, 8, 4, 2]


def test_mask_rcnn_on_the_vit_trains_and_predicts(scenes):
    s = load_config("mae", "smoke").eval.detection
    ds = coco_detection(scenes / "coco", "train", train=True)
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
    assert out[0]["masks"].shape[1:] == (1, 64, 64) and out[0]["boxes"].shape[1] == 4
