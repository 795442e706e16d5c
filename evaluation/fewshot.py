"""Few-shot linear probe by closed-form regularised least squares: UMD's own protocol
(Hansen-Estruch et al. arXiv 2406.17688; philippe-eecs/small-vision, the big_vision evaluator
big_vision/evaluators/fewshot_lsr.py with big_vision/configs/common_fewshot.py). UMD's README
reports "100 Shot LP" for ImageNet at 64 px (UMD-B/4: 31.8 after 800 epochs).

Per draw d (seed d = 0, 1, ..., ``eval.fewshot.draws`` - 1, as the authors' ``num_seeds``):
1. each class's training indices are permuted by ``numpy.random.default_rng(d)`` (one
   permutation per class, classes in order); the first ``n`` of each are the n-shot set (so the
   10-shot set is inside the 100-shot one; a class with fewer than n images gives all it has);
2. the n-shot features X (N, D) are whitened by their own mean and population std (+ 1e-5) and
   get a constant column of 100 (a bias that the ridge term barely touches);
3. targets Y (N, C) are the one-hot labels mapped to {-1, +1};
4. W = (X^T X + l2 I)^-1 X^T Y when N >= D + 1, else X^T (X X^T + l2 I)^-1 Y (the same solution,
   the smaller system), l2 = ``eval.fewshot.l2_reg`` = 1024, fixed (the authors do not tune it);
5. validation features, whitened with the training mean and std and padded alike, are
   classified by argmax(X_val W); the accuracy is averaged over the draws.

The features are the representation the authors' evaluator reads, ``pre_logits``: for UMD the
mean of its cls tokens after the final LayerNorm (``pooling: cls``). The authors solve in float32
by an eigendecomposition (to sweep l2 cheaply); here float64 ``linalg.solve`` on the job's
device: the same solution, without TF32 matmuls (enabled for training) perturbing it.
Departure kept: the authors draw the shots from ``train[:100000]`` (the first 100k images of
TFDS's shuffled training split, ~100 per class); here from the whole training split (or its
first ``max_train_samples``), since this project's splits are not stored shuffled.

Every rank holds the same gathered features and draws the same indices from the same seeds, so
each computes the same answer: no collective.

    python -m evaluation.fewshot --run-dir runs/<name> [--dataset NAME] [--set KEY=VALUE] [--baseline random_init|pixels]
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.common import EvalContext, parse_args, run_eval
from evaluation.features import frozen

BIAS_CONSTANT = 100.0          # the authors' constant feature for the bias
STD_EPS = 1e-5                 # added to the per-dimension std before whitening


def draw_shots(labels: np.ndarray, num_classes: int, shots: list[int], seed: int) -> dict[int, np.ndarray]:
    """n -> indices into ``labels`` of the n-shot set of draw ``seed``: per class (in order) the
    first n of a permutation of its indices by ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    return {n: np.concatenate([idx[:n] for idx in per_class]) for n in shots}


class RidgeProbe:
    """Closed-form ridge regression to {-1, +1} one-hot targets on whitened features, float64.

    x (N, D) and y (N,) -> weights (D + 1, C), with the whitening statistics (1, D)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, l2_reg: float) -> None:
        x = x.double()
        self.mean = x.mean(dim=0, keepdim=True)                               # (1, D)
        self.std = x.std(dim=0, unbiased=False, keepdim=True) + STD_EPS       # population std
        a = self.design(x)                                                    # (N, D + 1)
        t = 2.0 * F.one_hot(y.long(), num_classes).double() - 1.0             # (N, C)
        n, d = a.shape
        if n >= d:           # (A^T A + l2 I)^-1 A^T T: a (D + 1)-square system
            gram = a.T @ a + l2_reg * torch.eye(d, dtype=a.dtype, device=a.device)
            self.w = torch.linalg.solve(gram, a.T @ t)
        else:                # A^T (A A^T + l2 I)^-1 T: an N-square system
            gram = a @ a.T + l2_reg * torch.eye(n, dtype=a.dtype, device=a.device)
            self.w = a.T @ torch.linalg.solve(gram, t)                       # (D + 1, C)

    def design(self, x: torch.Tensor) -> torch.Tensor:
        """Whitened features with the constant bias column: (M, D) -> (M, D + 1)."""
        return F.pad((x.double() - self.mean) / self.std, (0, 1), value=BIAS_CONSTANT)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Class (M,) of each row of ``x`` (M, D), ``chunk`` rows at a time."""
        return torch.cat([(self.design(x[i:i + chunk]) @ self.w).argmax(dim=1)
                          for i in range(0, x.shape[0], chunk)])


def fewshot_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor,
                     val_y: torch.Tensor, num_classes: int, shots: list[int], l2_reg: float,
                     draws: int) -> dict[str, float]:
    """Top-1 (%) per shot count, mean over ``draws`` (and its std when draws > 1); ``top1`` is
    the first shot count's."""
    labels = train_y.cpu().numpy()
    acc: dict[int, list[float]] = {n: [] for n in shots}
    for seed in range(draws):
        for n, idx in draw_shots(labels, num_classes, shots, seed).items():
            rows = torch.as_tensor(idx, device=train_f.device)
            probe = RidgeProbe(train_f[rows], train_y[rows], num_classes, l2_reg)
            acc[n].append((probe.predict(val_f) == val_y).double().mean().item() * 100)
    out: dict[str, float] = {}
    for n, values in acc.items():
        out[f"top1_{n}shot"] = float(np.mean(values))
        if draws > 1:
            out[f"top1_{n}shot_std"] = float(np.std(values, ddof=1))
    out["top1"] = out[f"top1_{shots[0]}shot"]
    return out


def compute(ctx: EvalContext, baseline: str, train_f, train_y, val_f, val_y,
            num_classes: int) -> dict[str, float]:
    s = ctx.section
    return fewshot_accuracy(train_f, train_y, val_f, val_y, num_classes, list(s.shots),
                            s.l2_reg, s.draws)


def main(run_dir: str, dataset: str = "", baseline: str | None = None, label: str = "",
         overrides: list[str] = ()) -> dict[str, dict[str, float]]:
    return run_eval(run_dir, "fewshot", frozen(compute), dataset, baseline, label,
                    overrides=overrides)


if __name__ == "__main__":
    args = parse_args(__doc__)
    main(args.run_dir, args.dataset, args.baseline, overrides=args.set)
