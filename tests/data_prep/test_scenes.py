from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_prep.scenes import generate
from hpc_mim.data.dense import ADE20K, IGNORE, segmentation_transform

SOURCE = Path("/usr/share/datasets/fashion-mnist")


def test_scenes_are_written_in_the_ade20k_layout_and_read_back(tmp_path):
    generate(SOURCE, tmp_path, train=10, val=4, size=64, seed=3)
    root = tmp_path / "ade20k"
    for split, n in (("training", 10), ("validation", 4)):
        images = sorted((root / "images" / split).glob("*.jpg"))
        labels = sorted((root / "annotations" / split).glob("*.png"))
        assert len(images) == len(labels) == n
        assert [p.stem for p in images] == [p.stem for p in labels]
    raw = np.array(Image.open(root / "annotations" / "training" / "scene_00000001.png"))
    assert raw.dtype == np.uint8 and raw.shape == (64, 64)
    assert set(np.unique(raw)) <= set(range(12)) and (raw == 1).any() and (raw >= 2).any()
    # reduce_zero_label: 0 -> ignore, k -> k - 1
    image, label = ADE20K(root, "train")[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    expected = torch.from_numpy(raw.astype(np.int64) - 1)
    expected[expected < 0] = IGNORE
    assert torch.equal(label, expected)
    # the training pipeline keeps image and label aligned: crops of the requested size
    train = ADE20K(root, "train", segmentation_transform(True, 64, 32, [0.5] * 3, [0.25] * 3))
    x, y = train[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (32, 32)
    assert set(y.unique().tolist()) <= set(range(11)) | {IGNORE}


def test_generation_is_deterministic_per_seed(tmp_path):
    generate(SOURCE, tmp_path / "a", train=3, val=1, seed=5)
    generate(SOURCE, tmp_path / "b", train=3, val=1, seed=5)
    for rel in ("ade20k/annotations/training/scene_00000003.png", "coco/annotations/instances_train2017.json"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
