"""Training-loader throughput, side by side: our FFCV loader (.beton, seeded crops), FFCV's
stock RandomResizedCrop + flip decoder, and a torchvision PIL DataLoader.

All read the same Fashion-MNIST training images and produce the same batches (random resized
crop + flip + normalise, float (B, 3, S, S)); no model runs. Prints img/s per epoch and writes
JSON. FFCV's first epoch includes its numba compilation. The stock decoder shows what the
per-sample reseeding of hpc_mim/data/ffcv_io.py's SeededRandomResizedCrop (exact resume) costs.

    python benchmarks/loader_throughput.py --beton data/fmnist/train.beton --images 20000 --out runs/bench_loader.json

``imagenet_decode`` (``make bench``'s ImageNet section, benchmarks/bench.py) answers what a GPU
node needs from its CPUs: FFCV's JPEG decode + RandomResizedCrop to 224 + flip, in images/s per
core, on ImageNet-sized JPEGs, and so how many cores feed one GPU at the MAE ViT-B/16 rate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_prep import synthetic  # noqa: E402
from data_prep.fashion_mnist import DEFAULT_SOURCE, load_split  # noqa: E402
from hpc_mim.data.ffcv_io import build_loader, iterate, page_size_for, write_beton  # noqa: E402

MEAN, STD = [0.286] * 3, [0.353] * 3


class PILImages(Dataset):
    """The same images as PIL RGB, through torchvision transforms (the usual ImageFolder path)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int) -> None:
        self.images, self.labels = images, labels
        self.tf = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0)), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.tf(Image.fromarray(self.images[i]).convert("RGB")), int(self.labels[i])


def timed_epochs(batches, epochs: int) -> list[float]:
    rates = []
    for epoch in range(epochs):
        start, n = time.time(), 0
        for images in batches(epoch):
            n += images.shape[0]
        rates.append(n / (time.time() - start))
    return rates


# ------------------------------------------------------------------ ImageNet-sized JPEG decode

# FFCV's ImageNet recipe (libffcv/ffcv-imagenet README, ResNet-50): JPEGs of at most 500 px a
# side at quality 90 (it stores half of them raw; jpg mode here is all JPEG: the CPU's worst case)
IMAGENET_MAX_RESOLUTION, IMAGENET_JPEG_QUALITY = 500, 90
# Grain (luminance, std in grey levels) on the synthetic glyph pictures, so that their JPEGs
# carry about ImageNet's ~110 KB per image (0.6 byte/pixel at ~470 x 390): decoding time
# follows the entropy-coded bytes as well as the pixels, and flat drawings would be ~30 KB.
IMAGENET_GRAIN = 32.0
# The MAE ViT-B/16 pre-training rate of one GPU when make gpu-check has not measured one here
# (runs/gpu_check/throughput.json): the ConvMAE maintainers' MAE ViT-B figure, 128 images per
# GPU at 0.408 s per step on RTX A6000s = 313 img/s (github.com/Alpha-VL/ConvMAE/issues/5),
# scaled by the dense 16-bit tensor peaks, H100 SXM 989 / A6000 155 TFLOP/s: ~2,000 img/s.
ASSUMED_GPU = {"img_per_s": 2000.0, "device": "H100 (assumed)",
               "source": "assumed: MAE ViT-B 313 img/s on an RTX A6000 (Alpha-VL/ConvMAE#5) x 989/155 "
                         "TFLOP/s (H100 SXM / A6000 dense 16-bit peaks); replace with make gpu-check's "
                         "runs/gpu_check/throughput.json"}


class ImageNetLike:
    """``n`` synthetic ImageNet-sized RGB pictures for the FFCV writer: data_prep.synthetic's
    glyph scenes at its ImageNet shapes (500x375, 375x500, 640x480, 1024x768, 333x500), the
    larger ones drawn at ``max_side`` (what the writer would resize them to), with luminance
    grain of std ``grain``. Sample i is a pure function of (seed, i): (H, W, 3) uint8, label."""

    def __init__(self, n: int, max_side: int = IMAGENET_MAX_RESOLUTION, grain: float = IMAGENET_GRAIN,
                 seed: int = 0, classes: int = 4) -> None:
        self.n, self.max_side, self.grain, self.seed, self.classes = n, max_side, grain, seed, classes

    def __len__(self) -> int:
        return self.n

    def shape(self, i: int) -> tuple[int, int]:
        """(width, height) of sample i."""
        w, h = synthetic.SIZES[i % len(synthetic.SIZES)]
        scale = min(1.0, self.max_side / max(w, h))
        return int(w * scale), int(h * scale)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng((self.seed, i))
        label = i % self.classes
        w, h = self.shape(i)
        image = synthetic.classification_image(label, rng, w, h).astype(np.float32)
        image += rng.normal(0.0, self.grain, (h, w, 1)).astype(np.float32)
        return np.clip(image, 0, 255).astype(np.uint8), label


def write_imagenet_like(path: str, images: int, quality: int = IMAGENET_JPEG_QUALITY,
                        max_resolution: int = IMAGENET_MAX_RESOLUTION, workers: int = 2,
                        sample: int = 100) -> dict[str, Any]:
    """Write ``images`` ImageNet-like pictures to a jpg-mode ``.beton`` at ``path``; returns
    what they are: count, mean width/height, and the mean JPEG size over the first ``sample``
    (encoded as FFCV's writer does: OpenCV at ``quality``)."""
    data = ImageNetLike(images, max_resolution)
    write_beton(path, data, max_resolution=max_resolution, mode="jpg", jpeg_quality=quality,
                num_workers=workers, page_size=page_size_for(max_resolution, max_resolution, "jpg",
                                                             max_resolution))
    picked = range(min(sample, images))
    nbytes = [len(cv2.imencode(".jpg", cv2.cvtColor(data[i][0], cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, quality])[1]) for i in picked]
    shapes = np.array([data.shape(i) for i in range(images)])
    return {"images": images, "max_resolution": max_resolution, "jpeg_quality": quality,
            "mean_width": float(shapes[:, 0].mean()), "mean_height": float(shapes[:, 1].mean()),
            "mean_jpeg_kb": float(np.mean(nbytes) / 1e3)}


def decode_rate(beton: str, workers: int, crop: str, batch_size: int = 64, size: int = 224,
                epochs: int = 3) -> dict[str, float]:
    """The project's training loader (hpc_mim/data/ffcv_io.py ``build_loader``: ``crop=
    "seeded"``, the resumable crops pre-training uses, or FFCV's ``"stock"`` decoder) with
    ``workers`` decoding threads, over the epochs after the first (numba's compilation):
    ``img_per_s`` (wall clock) and ``img_per_cpu_s`` (images per CPU-second of this process,
    all its threads: what one core decodes when nothing else runs on it; unlike the wall
    clock, it holds on a machine shared with other jobs). RandomResizedCrop scale (0.2, 1) as
    MAE. On the CPU the loader also normalises (on a GPU node the GPU does), so both slightly
    understate what a GPU node's cores decode."""
    loader = build_loader(beton, batch_size, size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                          train=True, seed=0, crop_scale=(0.2, 1.0), num_workers=workers, crop=crop)
    n, seconds, cpu = 0, 0.0, 0.0
    for epoch in range(epochs):
        start, start_cpu, count = time.perf_counter(), time.process_time(), 0
        for batch in iterate(loader, epoch):
            count += batch["image"].shape[0]
        if epoch > 0 or epochs == 1:
            n += count
            seconds += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
    return {"img_per_s": n / seconds, "img_per_cpu_s": n / cpu}


def gpu_rate(throughput_json: Path | None) -> dict[str, Any]:
    """The MAE ViT-B/16 img/s of one GPU: ``make gpu-check``'s measurement when its JSON
    (benchmarks/gpu_throughput.py) exists, else ``ASSUMED_GPU``."""
    if throughput_json is not None and Path(throughput_json).is_file():
        got = json.loads(Path(throughput_json).read_text())
        return {"img_per_s": float(got["img_per_s"]), "device": got.get("device", "?"),
                "source": f"measured: {throughput_json} (benchmarks/gpu_throughput.py, batch "
                          f"{got.get('batch', '?')}, {got.get('precision', '?')})"}
    return dict(ASSUMED_GPU)


def imagenet_decode(images: int = 2000, workers: Sequence[int] = (1, 2),
                    crops: Sequence[str] = ("seeded", "stock"), batch_size: int = 64, epochs: int = 3,
                    throughput_json: Path | None = Path("runs/gpu_check/throughput.json"),
                    folder: str | None = None) -> dict[str, Any]:
    """FFCV decode + RandomResizedCrop 224 + flip of ImageNet-sized JPEGs, per crop decoder and
    number of decoding threads, and the cores one GPU needs at the MAE ViT-B/16 rate. Keys:
    ``data`` (write_imagenet_like); ``img_per_s[crop][threads]`` (wall clock),
    ``img_per_s_per_core[crop][threads]`` (= img/s / threads), ``img_per_cpu_s[crop][threads]``
    (images per CPU-second: the per-core rate on an unshared core); ``gpu`` (gpu_rate);
    ``cores_per_gpu`` = gpu img/s / ``img_per_cpu_s["seeded"]["1"]`` (the project's loader,
    one decoding thread), and ``cores_per_gpu_wall`` the same from the wall-clock per-core
    rate (equal on an idle machine, larger when other jobs share the cores)."""
    with tempfile.TemporaryDirectory(dir=folder, prefix="imagenet-decode-") as tmp:
        beton = os.path.join(tmp, "train.beton")
        data = write_imagenet_like(beton, images)
        runs = {crop: {str(w): decode_rate(beton, w, crop, batch_size, epochs=epochs) for w in workers}
                for crop in crops}
    one = str(min(workers))
    gpu = gpu_rate(throughput_json)
    per_core = {c: {w: r["img_per_s"] / int(w) for w, r in by.items()} for c, by in runs.items()}
    cpu = {c: {w: r["img_per_cpu_s"] for w, r in by.items()} for c, by in runs.items()}
    return {"data": data, "batch_size": batch_size, "size": 224, "timed_epochs": max(1, epochs - 1),
            "img_per_s": {c: {w: r["img_per_s"] for w, r in by.items()} for c, by in runs.items()},
            "img_per_s_per_core": per_core, "img_per_cpu_s": cpu, "gpu": gpu,
            "cores_per_gpu": gpu["img_per_s"] / cpu["seeded"][one],
            "cores_per_gpu_wall": gpu["img_per_s"] / per_core["seeded"][one]}


def format_imagenet_decode(r: dict[str, Any]) -> str:
    d = r["data"]
    lines = [f"FFCV JPEG decode + RandomResizedCrop 224 + flip, {d['images']} ImageNet-like JPEGs "
             f"(mean {d['mean_width']:.0f}x{d['mean_height']:.0f}, {d['mean_jpeg_kb']:.0f} KB, quality "
             f"{d['jpeg_quality']}, max side {d['max_resolution']}), batch {r['batch_size']}:"]
    for crop, by in r["img_per_s"].items():
        for w, rate in by.items():
            lines.append(f"  {crop:>6} crops, {w} thread(s): {rate:6,.0f} img/s wall = "
                         f"{r['img_per_s_per_core'][crop][w]:5,.0f} per core; "
                         f"{r['img_per_cpu_s'][crop][w]:5,.0f} img per CPU-second")
    g = r["gpu"]
    lines.append(f"  cores per GPU = {g['img_per_s']:,.0f} img/s (MAE ViT-B/16, {g['device']}) / "
                 f"{r['img_per_cpu_s']['seeded']['1']:,.0f} img per CPU-second (seeded, 1 thread) = "
                 f"{r['cores_per_gpu']:.1f} (wall clock: {r['cores_per_gpu_wall']:.1f})\n"
                 f"  GPU rate: {g['source']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beton", default="data/fmnist/train.beton")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    ffcv = build_loader(args.beton, args.batch_size, args.size, MEAN, STD, train=True,
                        num_workers=args.workers, max_samples=args.images)
    ffcv_rates = timed_epochs(lambda e: (b["image"] for b in iterate(ffcv, e)), args.epochs)
    stock = build_loader(args.beton, args.batch_size, args.size, MEAN, STD, train=True,
                         num_workers=args.workers, max_samples=args.images, crop="stock")
    stock_rates = timed_epochs(lambda e: (b["image"] for b in iterate(stock, e)), args.epochs)

    images, labels = load_split(Path(DEFAULT_SOURCE), "train")
    pil = DataLoader(PILImages(images[:args.images], labels[:args.images], args.size),
                     batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                     drop_last=True, persistent_workers=True)
    pil_rates = timed_epochs(lambda e: (x for x, _ in pil), args.epochs)

    result = {"images": args.images, "batch_size": args.batch_size, "workers": args.workers,
              "ffcv_img_per_s": ffcv_rates, "stock_ffcv_img_per_s": stock_rates, "pil_img_per_s": pil_rates,
              "speedup_after_first_epoch": float(np.mean(ffcv_rates[1:]) / np.mean(pil_rates[1:])),
              "seeded_over_stock": float(np.mean(ffcv_rates[1:]) / np.mean(stock_rates[1:]))}
    for name in ("ffcv", "stock_ffcv", "pil"):
        print(f"{name:>10}: " + "  ".join(f"epoch {i}: {r:,.0f} img/s" for i, r in enumerate(result[f'{name}_img_per_s'])))
    print(f"FFCV / PIL after the first epoch: {result['speedup_after_first_epoch']:.2f}x; "
          f"seeded crops / FFCV's stock decoder: {result['seeded_over_stock']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
