"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol,
Caron et al. arXiv 2104.14294, facebookresearch/dino:eval_knn.py).

Features are L2-normalised; each test sample takes the k most cosine-similar training samples,
whose labels vote with weight exp(sim / T), T = 0.07.

    python -m evaluation.knn --run-dir runs/<name> [--dataset NAME] [--set KEY=VALUE] [--baseline random_init|pixels]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from evaluation.common import EvalContext, parse_args, run_eval
from evaluation.features import frozen


@torch.no_grad()
def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, k: int,
                temperature: float, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """Class votes (N_test, C): train_f (N, D), train_y (N,), test_f (M, D)."""
    train_f = F.normalize(train_f, dim=1)
    test_f = F.normalize(test_f, dim=1)
    k = min(k, train_f.shape[0])
    votes = []
    for start in range(0, test_f.shape[0], chunk):
        sim = test_f[start:start + chunk] @ train_f.T                     # (b, N) cosine
        top_sim, top_idx = sim.topk(k, dim=1)                             # (b, k)
        weights = (top_sim / temperature).exp()
        v = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.append(v.scatter_add_(1, train_y[top_idx], weights))
    return torch.cat(votes)


def knn_accuracy(train_f, train_y, test_f, test_y, ks, temperature, num_classes) -> dict[str, float]:
    """Top-1 accuracy (%) per k."""
    out = {}
    for k in ks:
        pred = knn_predict(train_f, train_y, test_f, k, temperature, num_classes).argmax(dim=1)
        out[f"knn_top1_k{k}"] = (pred == test_y).float().mean().item() * 100
    return out


def compute(ctx: EvalContext, baseline: str, train_f, train_y, val_f, val_y,
            num_classes: int) -> dict[str, float]:
    """Every rank computes the same votes from the same gathered features (no training)."""
    kc = ctx.section
    metrics = knn_accuracy(train_f, train_y, val_f, val_y, kc.ks, kc.temperature, num_classes)
    metrics["top1"] = metrics[f"knn_top1_k{20 if 20 in kc.ks else kc.ks[0]}"]  # k=20: DINO's usual best
    return metrics


def main(run_dir: str, dataset: str = "", baseline: str | None = None, label: str = "",
         overrides: list[str] = ()) -> dict[str, dict[str, float]]:
    return run_eval(run_dir, "knn", frozen(compute), dataset, baseline, label, overrides=overrides)


if __name__ == "__main__":
    args = parse_args(__doc__)
    main(args.run_dir, args.dataset, args.baseline, overrides=args.set)
