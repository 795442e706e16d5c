import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
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


def bad_image_corpus(root: Path) -> dict[str, str | None]:
    """One class folder of real-world trouble; file name -> expected skip reason (None = kept)."""
    rng = np.random.default_rng(1)
    folder = root / "train" / "things"
    folder.mkdir(parents=True)
    photo = rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    Image.fromarray(photo).save(folder / "good.jpg", quality=95)
    Image.fromarray(photo).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(photo).convert("L").save(folder / "gray.png")
    Image.fromarray(photo).convert("P").save(folder / "palette.png")
    Image.fromarray(np.dstack([photo, np.full((48, 64), 128, np.uint8)])).save(folder / "alpha.png")
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(folder / "sixteen_bit.png")
    Image.fromarray(np.zeros((3000, 4000, 3), np.uint8)).save(folder / "huge.png")   # 12 MP
    Image.fromarray(photo[:3, :3]).save(folder / "tiny.png")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(rng.integers(0, 255, 5000, dtype=np.uint8).tobytes())
    full = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    return {"good.jpg": None, "cmyk.jpg": None, "gray.png": None, "palette.png": None,
            "alpha.png": None, "sixteen_bit.png": None, "huge.png": None,
            "tiny.png": "too small", "zero.jpg": "empty file",
            "corrupt.jpg": "not an image", "truncated.jpg": "truncated"}


def test_bad_image_corpus_converts_with_the_right_skip_list(tmp_path, capsys):
    expected = bad_image_corpus(tmp_path / "src")
    out = image_folder.convert(tmp_path / "src", tmp_path / "out", ["train"], 32, "raw", 2,
                               max_bad_fraction=0.5)
    manifest = json.loads((tmp_path / "out" / "train.json").read_text())
    skipped = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert sorted(skipped) == sorted(k for k, v in expected.items() if v)
    for name, reason in skipped.items():
        assert expected[name] in reason, (name, reason)
    assert manifest["num_files"] == 11 and manifest["num_skipped"] == 4 and manifest["num_samples"] == 7
    assert num_samples(str(out["train"])) == 7
    printed = capsys.readouterr().out
    assert "train: 7 of 11 images converted, 4 skipped" in printed and "skipped train/things/zero.jpg" in printed
    # the kept ones decode to what they should be (16-bit scaled, not clipped to white)
    got, _ = read_back(out["train"], 32, 7)
    order = sorted(k for k, v in expected.items() if v is None)     # files are read sorted
    sixteen = got[order.index("sixteen_bit.png")]
    assert abs(int(sixteen.float().mean().round()) - round(40000 / 65535 * 255)) <= 1


def test_bad_images_exit_code_follows_the_allowed_fraction(tmp_path):
    bad_image_corpus(tmp_path / "src")
    args = ["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--splits", "train",
            "--mode", "raw", "--max-resolution", "32", "--workers", "1"]
    assert image_folder.main(args + ["--max-bad-fraction", "0.5"]) == 0      # 4 of 11 bad
    assert image_folder.main(args + ["--max-bad-fraction", "0.3"]) == 1
    assert (tmp_path / "out" / "train.beton").is_file()                     # written anyway
    assert image_folder.main(args + ["--min-size", "2", "--max-bad-fraction", "0.3"]) == 0   # tiny kept


def noisy_photo_tree(root: Path) -> None:
    """Real large noisy files: a 12 MP JPEG and a 3 MP PNG of uniform noise (their JPEGs at
    quality 90 are ~10x and ~2x FFCV's former fixed 2 MiB page), next to small images."""
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    big = root / "train" / "b"
    Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(big / "noise_12mp.jpg", quality=95)
    Image.fromarray(rng.integers(0, 255, (1500, 2000, 3), dtype=np.uint8)).save(big / "noise_3mp.png")


def test_large_noisy_photos_convert_with_a_page_size_that_fits(tmp_path):
    """No --max-resolution: the page size is computed from the largest image, recorded in the
    manifest, and the big samples read back at full size. (FFCV's writer used to hang forever
    here: its worker died on "Tried allocating N but page size is 2097152".)"""
    noisy_photo_tree(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "data_prep.image_folder", "--src", str(tmp_path / "src"),
                        "--out", str(tmp_path / "out"), "--mode", "jpg"],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "train.json").read_text())
    assert manifest["largest_image"] == {"file": "b/noise_12mp.jpg", "width": 4000, "height": 3000}
    assert manifest["page_size"] >= 4000 * 3000 * 3 and manifest["num_samples"] == 8
    from ffcv.reader import Reader
    meta = Reader(str(tmp_path / "out" / "train.beton")).metadata["f0"]      # the image field
    assert sorted(zip(meta["width"], meta["height"]))[-2:] == [(2000, 1500), (4000, 3000)]


WRITE_TOO_SMALL_PAGES = """
import sys
from pathlib import Path
from data_prep.image_folder import ImageFolderSamples, scan
from hpc_mim.data.ffcv_io import write_beton
root = Path(sys.argv[1]) / "train"
samples, _ = scan(root)
write_beton(sys.argv[2], ImageFolderSamples(samples, root), mode="jpg", page_size=1 << 21)
"""


def test_a_failing_writer_worker_ends_the_conversion_naming_the_file(tmp_path):
    """Whatever kills a writer worker (here: pages too small for the 12 MP noise photo), the
    conversion stops at once with the file named and a non-zero exit, and leaves no partial
    .beton -- never a hang."""
    noisy_photo_tree(tmp_path / "src")
    out = tmp_path / "x.beton"
    r = subprocess.run([sys.executable, "-c", WRITE_TOO_SMALL_PAGES, str(tmp_path / "src"), str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    assert "BetonWriteError" in r.stderr and "b/noise_12mp.jpg" in r.stderr, r.stderr[-2000:]
    assert "page size is 2097152" in r.stderr and not out.exists()
