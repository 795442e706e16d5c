"""Where a pre-trained encoder's advantage goes on dense tasks: a per-token linear probe on frozen
features, for a run's exported encoder and its random-init twin (same architecture and seed as
the evaluations' ``random_init`` baseline).

The last block's tokens are standardised and a linear classifier is trained per token
(cross-entropy, AdamW, everything in memory), then scored on held-out images:

- ``items``: single Fashion-MNIST items (train items to fit, test items to score) on a black
  canvas. 28 px is the pre-training image (7 x 7 grid for the demo's patch 4); on a 64 px canvas
  (16 x 16 grid) the item sits at grid positions the encoder saw in pre-training (top-left), at
  positions it never saw (bottom-right), or anywhere. A token's label is the item's class when
  most of its pixels are item, else background; the score is accuracy on item tokens.
- ``scenes``: random crops of the composed scenes (data_prep.scenes, ADE20K layout); a token's
  label is the majority label of its patch; the score is token mIoU and accuracy.

    python benchmarks/dense_probe.py --run-dir runs/demo-mae-20261123-221252 --out runs/bench_dense_probe.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_prep.fashion_mnist import DEFAULT_SOURCE, load_split  # noqa: E402
from evaluation.common import encoder_for, load_run  # noqa: E402
from evaluation.segmentation import confusion_matrix, segmentation_metrics  # noqa: E402
from hpc_mim.data.dense import ADE20K, IGNORE  # noqa: E402

THRESHOLD = 48                    # an item's pixels, as in data_prep.scenes


def token_labels(pixel_labels: torch.Tensor, patch: int, num_classes: int) -> torch.Tensor:
    """(N, H, W) labels in [0, K) or 255 -> (N * gh * gw,) majority label per patch (IGNORE when
    most of the patch is unlabelled)."""
    y = pixel_labels.long().clone()
    y[y == IGNORE] = num_classes
    votes = F.avg_pool2d(F.one_hot(y, num_classes + 1).permute(0, 3, 1, 2).float(), patch)
    out = votes.argmax(1)
    out[out == num_classes] = IGNORE
    return out.flatten()


def items_on_canvas(split: str, n: int, canvas: int, where: str, mean: float, std: float,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 3, canvas, canvas) with one item each; pixel labels 0 = background, c + 1."""
    images, classes = load_split(Path(DEFAULT_SOURCE), split)
    rng = np.random.default_rng(seed)
    x = torch.zeros(n, canvas, canvas)
    y = torch.zeros(n, canvas, canvas, dtype=torch.long)
    for k in range(n):
        top = {"top-left": 0, "bottom-right": canvas - 28}.get(where)
        oy, ox = (top, top) if top is not None else rng.integers(0, canvas - 28 + 1, 2)
        item = torch.from_numpy(images[k].astype(np.float32))
        x[k, oy:oy + 28, ox:ox + 28] = item
        y[k, oy:oy + 28, ox:ox + 28] = torch.where(item >= THRESHOLD, int(classes[k]) + 1, 0)
    x = ((x / 255 - mean) / std)[:, None].expand(-1, 3, -1, -1).contiguous()
    return x, y


def scene_crops(root: str, split: str, n: int, crop: int, patch: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop x crop windows (aligned to the patch grid) of ``n`` scenes at their own size."""
    as_float = v2.Compose([v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                           v2.Normalize(mean, std)])          # no resizing: patches at their own size
    data = ADE20K(root, split, as_float, max_samples=n)
    g = torch.Generator().manual_seed(n)
    xs, ys = [], []
    for i in range(len(data)):
        image, label = data[i]
        h, w = label.shape
        a, b = (torch.randint(0, (s - crop) // patch + 1, (1,), generator=g).item() * patch for s in (h, w))
        xs.append(image[:, a:a + crop, b:b + crop])
        ys.append(label[a:a + crop, b:b + crop])
    return torch.stack(xs).float(), torch.stack(ys)


@torch.no_grad()
def tokens(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Last block's token maps -> (N * gh * gw, D)."""
    maps = [encoder.forward_intermediates(x[i:i + 200], [encoder.depth - 1])[0] for i in range(0, len(x), 200)]
    f = torch.cat(maps)
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


def probe(f_fit: torch.Tensor, y_fit: torch.Tensor, f_test: torch.Tensor, classes: int,
          epochs: int = 30) -> torch.Tensor:
    """Predictions for ``f_test`` of a linear classifier fitted on standardised ``f_fit``."""
    mu, sd = f_fit.mean(0), f_fit.std(0) + 1e-6
    keep = y_fit != IGNORE
    f_fit, y_fit = (f_fit[keep] - mu) / sd, y_fit[keep]
    torch.manual_seed(0)
    linear = torch.nn.Linear(f_fit.shape[1], classes)
    opt = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(f_fit)).split(4096):
            loss = F.cross_entropy(linear(f_fit[idx]), y_fit[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return linear((f_test - mu) / sd).argmax(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--scenes", default="fmnist_scenes_ade", help="segmentation dataset (ADE20K layout)")
    p.add_argument("--items", type=int, default=2000, help="items (or scenes) to fit; a quarter to score")
    p.add_argument("--crop", type=int, default=32, help="scene crop size (the preset's segmentation crop)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(2)
    run, cfg = load_run(args.run_dir)
    info = cfg.dataset_info(args.scenes)
    encoders = {"pretrained": encoder_for(run, cfg, "pretrained").eval(),
                "random_init": encoder_for(run, cfg, "random_init").eval()}
    patch = encoders["pretrained"].patch_size
    mean, std = info["mean"][0], info["std"][0]
    n_fit, n_test = args.items, args.items // 4
    results = []
    for canvas, where in ((28, "anywhere"), (64, "top-left"), (64, "bottom-right"), (64, "anywhere")):
        fit = items_on_canvas("train", n_fit, canvas, where, mean, std, seed=0)
        test = items_on_canvas("val", n_test, canvas, where, mean, std, seed=1)
        y_fit, y_test = token_labels(fit[1], patch, 11), token_labels(test[1], patch, 11)
        row = {"probe": f"items, {canvas} px canvas, {where}"}
        for name, enc in encoders.items():
            pred = probe(tokens(enc, fit[0]), y_fit, tokens(enc, test[0]), 11)
            on_item = (y_test > 0) & (y_test != IGNORE)
            row[name] = 100 * (pred[on_item] == y_test[on_item]).float().mean().item()
        results.append(row)
        print(f"{row['probe']:<40} item-token acc: pretrained {row['pretrained']:.1f}  "
              f"random init {row['random_init']:.1f}", flush=True)
    k = info["num_classes"]
    fit = scene_crops(info["root"], "train", n_fit, args.crop, patch, info["mean"], info["std"])
    test = scene_crops(info["root"], "val", n_test, args.crop, patch, info["mean"], info["std"])
    y_fit, y_test = token_labels(fit[1], patch, k), token_labels(test[1], patch, k)
    row = {"probe": f"scenes, {args.crop} px crops"}
    for name, enc in encoders.items():
        pred = probe(tokens(enc, fit[0]), y_fit, tokens(enc, test[0]), k)
        metrics = segmentation_metrics(confusion_matrix(pred, y_test, k))   # the evaluation's metrics
        row[name], row[f"{name}_acc"] = metrics["miou"], metrics["pixel_acc"]
    results.append(row)
    print(f"{row['probe']:<40} token mIoU: pretrained {row['pretrained']:.1f}  "
          f"random init {row['random_init']:.1f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"run_dir": args.run_dir, "results": results}, indent=2))


if __name__ == "__main__":
    main()
