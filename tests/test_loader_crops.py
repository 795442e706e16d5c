"""LUT's crop (the authors' main_lut.py): Resize(short side) + RandomCrop(padding 4, reflect) +
flip, decoded by FFCV with per-sample seeds. Every crop must be one of torchvision's windows."""
import os
import subprocess
import sys

import numpy as np
import torch

from conftest import REPO


def coordinate_images(n: int, h: int, w: int) -> list:
    """Images whose pixels name their own (row, col, sample): a crop reveals its window."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return [(np.stack([r * 4, c * 4, np.full_like(r, i)], -1).astype(np.uint8), i) for i in range(n)]


def windows(img: np.ndarray, size: int, padding: int) -> list[np.ndarray]:
    """Every crop torchvision's RandomCrop(size, padding, reflect) + optional flip can give."""
    padded = np.pad(img, ((padding, padding), (padding, padding), (0, 0)), mode="reflect")
    out = []
    for top in range(padded.shape[0] - size + 1):
        for left in range(padded.shape[1] - size + 1):
            crop = padded[top:top + size, left:left + size]
            out += [crop, crop[:, ::-1]]
    return out


def decode(path: str, size: int, crop: str = "pad") -> list[np.ndarray]:
    from hpc_mim.data.ffcv_io import build_loader, iterate
    loader = build_loader(path, 8, size, [0, 0, 0], [1 / 255] * 3, train=True, seed=3,
                          crop_scale=(0.2, 1.0), num_workers=1, train_crop=crop, crop_padding=4)
    images = []
    for batch in iterate(loader, epoch=0):
        images += [x.permute(1, 2, 0).round().to(torch.uint8).numpy() for x in batch["image"]]
    return images


def test_pad_crops_are_torchvision_windows_of_the_resized_image(tmp_path):
    from hpc_mim.data.ffcv_io import write_beton
    # 28 x 40: Resize(28) keeps it (short side already 28), the window slides along the width
    samples = coordinate_images(16, 28, 40)
    path = str(tmp_path / "d.beton")
    write_beton(path, samples)
    got = decode(path, 28)
    assert len(got) == 16
    offsets = set()
    for img in got:
        src = samples[int(img[0, 0, 2])][0]
        matches = [k for k, w in enumerate(windows(src, 28, 4)) if np.array_equal(w, img)]
        assert matches, "not a reflect-padded window of the image"
        offsets.add(matches[0] // 2)
    assert len(offsets) > 4                       # windows really vary, not one fixed crop


def test_crops_are_the_same_with_numba_jit(tmp_path):
    """The numba-compiled decoder (what real runs use) draws the very same windows, for LUT's
    padded crops and for the random resized crops of every other recipe."""
    from hpc_mim.data.ffcv_io import write_beton
    path = str(tmp_path / "d.beton")
    write_beton(path, coordinate_images(16, 36, 30))            # Resize(28): 33 x 28
    code = ("import sys, numpy as np; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests'];"
            "from test_loader_crops import decode; "
            "np.save(sys.argv[3], np.stack([np.stack(decode(sys.argv[2], 28, c)) for c in ('pad', 'resized')]))")
    out = tmp_path / "jit.npy"
    env = {**os.environ, "HPC_MIM_FFCV_JIT": "1"}
    subprocess.run([sys.executable, "-c", code, str(REPO), path, str(out)], check=True, env=env,
                   timeout=300)
    interpreted = np.stack([np.stack(decode(path, 28, c)) for c in ("pad", "resized")])
    assert np.array_equal(np.load(out), interpreted)
    assert len({img.tobytes() for img in interpreted[1]}) == 16       # resized crops vary


def test_interpreted_decoders_leave_the_training_threads_generator_alone(tmp_path):
    """Decoded in FFCV's loader thread as Python (HPC_MIM_FFCV_JIT=0, as in the tests), the
    per-sample reseeding must not touch numpy's global generator, which the training thread
    draws from (timm's Mixup): else a run would not repeat itself, let alone after a resume."""
    from hpc_mim.data.ffcv_io import write_beton
    path = str(tmp_path / "d.beton")
    write_beton(path, coordinate_images(16, 36, 30))
    np.random.seed(7)
    expected = np.random.rand(4)
    np.random.seed(7)
    for crop in ("pad", "resized"):
        decode(path, 28, crop)
    assert np.array_equal(np.random.rand(4), expected)
