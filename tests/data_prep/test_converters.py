import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import fashion_mnist, image_folder
from hpc_mim.data.ffcv_io import build_loader, iterate, num_samples

SOURCE = Path(fashion_mnist.DEFAULT_SOURCE)


def read_back(path, size, n):
    """Eval-loader images as uint8 (N, 3, H, W) with the normalisation undone, and labels."""
    loader = build_loader(str(path), 16, size, [0.0] * 3, [1.0] * 3, train=False, num_workers=1)
    imgs, labels = [], []
    for b in iterate(loader):
        imgs.append((b["image"] * 255).round().to(torch.uint8).clone())
        labels.append(b["label"].clone())
    return torch.cat(imgs)[:n], torch.cat(labels)[:n]


def test_fashion_mnist_round_trip_is_bit_exact(tmp_path):
    out = fashion_mnist.convert(SOURCE, tmp_path / "fm", limit=40)
    images, labels = fashion_mnist.load_split(SOURCE, "val")
    got, got_y = read_back(out["val"], 28, 40)
    assert got.shape == (40, 3, 28, 28)
    assert torch.equal(got[:, 0], torch.from_numpy(images[:40].copy()))      # raw mode: exact pixels
    assert torch.equal(got[:, 0], got[:, 2])                                  # gray stored as RGB
    assert got_y.tolist() == labels[:40].tolist()
    manifest = json.loads((tmp_path / "fm" / "val.json").read_text())
    assert manifest["num_samples"] == 40 and len(manifest["classes"]) == 10
    assert sum(manifest["class_counts"].values()) == 40 and len(manifest["sha256"]) == 64


def test_idx_reader_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") * 3 + b"\x00" * 5)
    with pytest.raises(ValueError, match="expected"):
        fashion_mnist.read_idx(bad)
    assert fashion_mnist.main(["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1


def test_image_folder_converter(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog", "emu"):
            folder = tmp_path / "src" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                size = (20 + 7 * i, 24)
                arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
                mode = ["RGB", "L", "RGBA"][i % 3]
                Image.fromarray(arr).convert(mode).save(folder / f"{i}.png")
    (tmp_path / "src" / "train" / "cat" / "notes.txt").write_text("not an image")
    out = image_folder.convert(tmp_path / "src", tmp_path / "out", ["train", "val"], 32, "raw", 1)
    assert num_samples(str(out["train"])) == 12 and num_samples(str(out["val"])) == 6
    manifest = json.loads((tmp_path / "out" / "train.json").read_text())
    assert manifest["classes"] == ["cat", "dog", "emu"]
    assert manifest["class_counts"] == {"cat": 4, "dog": 4, "emu": 4}
    _, labels = read_back(out["val"], 16, 6)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
