"""k-nearest-neighbour classification on frozen features, by ``eval.knn.protocol``:

- ``dino`` (default): DINO's weighted kNN (Caron et al. arXiv 2104.14294,
  facebookresearch/dino:eval_knn.py), training split -> validation split. Features are
  L2-normalised; each validation sample takes the k most cosine-similar training samples, whose
  labels vote with weight exp(sim / T), T = 0.07. Metrics ``knn_top1_k<k>`` and ``top1`` (k=20).
- ``latentmim``: LatentMIM's "NN" figure (Wei et al. arXiv 2407.15837, 50.1 for ViT-B/16;
  yibingwei-1/LatentMIM:util/misc.py ``eval_knn``): 1-NN leave-one-out within the validation
  split on the mean of the patch tokens of the last block before the final norm (the authors set
  ``encoder.norm`` and ``encoder.head`` to Identity and pool ``[:, 1:]``), cosine similarity.
  The training split is not read. Metric ``loo_top1``: its own name, so the two never mix in a
  report column.

Leave-one-out excludes each query by its position (its own row of the similarity matrix), not
by an equal feature vector or index value: an exact duplicate elsewhere in the split stays a
candidate (it is another image). The authors take the second of ``topk(k=2)``, which is the
same unless a duplicate ties with the query itself, where their pick depends on topk's order.
Ties between candidates go to the lowest position (``argmax`` returns the first maximum, on CPU
and CUDA). Departures kept: the authors' loader drops the last incomplete batch of every rank
(``drop_last=True``: 49152 of the 50000 ImageNet images at 8 x 256); here every image is a
query and a candidate. Similarities are computed in float64, so TF32 matmuls (enabled for
training) cannot reorder near-ties.

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


@torch.no_grad()
def loo_nearest(f: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Position (N,) of each row's most cosine-similar other row of ``f`` (N, D), N >= 2.

    Chunks of ``chunk`` queries against all N rows, on ``f``'s device, in float64: the
    (chunk, N) similarity block is the only large temporary (1024 x 50000 x 8 B = 410 MB)."""
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"leave-one-out needs at least 2 samples, got {n}")
    g = F.normalize(f.double(), dim=1)                                    # (N, D) unit rows
    out = []
    for start in range(0, n, chunk):
        sim = g[start:start + chunk] @ g.T                                # (b, N) cosine
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, start + rows] = float("-inf")                           # the query itself
        out.append(sim.argmax(dim=1))                                     # first maximum on ties
    return torch.cat(out)


def loo_accuracy(f: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    """1-NN leave-one-out top-1 accuracy (%) of features ``f`` (N, D) with labels ``y`` (N,);
    one host sync, at the end."""
    return (y[loo_nearest(f, chunk)] == y).double().mean().item() * 100


def compute(ctx: EvalContext, baseline: str, train_f, train_y, val_f, val_y,
            num_classes: int) -> dict[str, float]:
    """Every rank computes the same answer from the same gathered features (no training, no
    collective)."""
    kc = ctx.section
    if kc.protocol == "latentmim":
        return {"loo_top1": loo_accuracy(val_f, val_y)}
    metrics = knn_accuracy(train_f, train_y, val_f, val_y, kc.ks, kc.temperature, num_classes)
    metrics["top1"] = metrics[f"knn_top1_k{20 if 20 in kc.ks else kc.ks[0]}"]  # k=20: DINO's usual best
    return metrics


def needs_train(section) -> bool:
    """LatentMIM's protocol reads the validation split alone."""
    return section.protocol != "latentmim"


def main(run_dir: str, dataset: str = "", baseline: str | None = None, label: str = "",
         overrides: list[str] = ()) -> dict[str, dict[str, float]]:
    return run_eval(run_dir, "knn", frozen(compute, needs_train), dataset, baseline, label,
                    overrides=overrides)


if __name__ == "__main__":
    args = parse_args(__doc__)
    main(args.run_dir, args.dataset, args.baseline, overrides=args.set)
