"""Seed statistics of a comparison: mean +- std, and the difference of two methods with a Welch
t-test, an exact permutation test and a bootstrap interval.

With a handful of seeds per method the tests have little power, and the exact permutation test
says how little: its smallest attainable two-sided p-value is 2 / C(n1 + n2, n1) for equal
groups (3 vs 3 seeds: 0.1), so no outcome can reach p < 0.05 and the report says so instead of
printing a p-value that reads like evidence.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

EXACT_LIMIT = 200_000          # splits enumerated exactly; beyond, a seeded Monte Carlo sample


@dataclass
class Difference:
    """``b`` - ``a`` (a method minus the baseline) over seeds."""
    delta: float
    welch_p: float             # nan when a group has fewer than 2 values or no variance
    perm_p: float
    ci_low: float
    ci_high: float
    min_p: float               # the smallest p the permutation test can give at these n
    too_small: bool            # min_p > alpha: n too small for significance


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof 1; nan for one value) and n."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p of Welch's unequal-variance t-test."""
    if len(a) < 2 or len(b) < 2 or (np.var(a) == 0 and np.var(b) == 0):
        return math.nan
    return float(stats.ttest_ind(b, a, equal_var=False).pvalue)


def permutation_p(a: list[float], b: list[float], seed: int = 0) -> float:
    """Two-sided permutation test of the difference of means: the share of the splits of the
    pooled values into groups of len(a) and len(b) whose |mean difference| is at least the
    observed one (all splits when there are at most EXACT_LIMIT)."""
    pooled = np.asarray([*a, *b], dtype=np.float64)
    n, k = len(pooled), len(a)
    observed = abs(np.mean(b) - np.mean(a))
    total = pooled.sum()

    def diff(idx: np.ndarray) -> np.ndarray:               # idx (S, k): group a's members
        sa = pooled[idx].sum(axis=1)
        return np.abs((total - sa) / (n - k) - sa / k)
    if math.comb(n, k) <= EXACT_LIMIT:
        idx = np.array(list(itertools.combinations(range(n), k)))
        return float(np.mean(diff(idx) >= observed - 1e-12))
    rng = np.random.default_rng(seed)
    idx = np.array([rng.permutation(n)[:k] for _ in range(EXACT_LIMIT)])
    return float((np.sum(diff(idx) >= observed - 1e-12) + 1) / (EXACT_LIMIT + 1))


def min_permutation_p(n1: int, n2: int) -> float:
    """The smallest two-sided p the exact test can give (distinct values): the observed split
    and, for equal groups, its mirror image are the only ones as extreme."""
    return (2 if n1 == n2 else 1) / math.comb(n1 + n2, n1)


def bootstrap_ci(a: list[float], b: list[float], level: float = 0.95, draws: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile interval of mean(b) - mean(a), resampling seeds within each group."""
    rng = np.random.default_rng(seed)
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    deltas = (rng.choice(b_, (draws, len(b_))).mean(axis=1) - rng.choice(a_, (draws, len(a_))).mean(axis=1))
    tail = (1 - level) / 2 * 100
    return float(np.percentile(deltas, tail)), float(np.percentile(deltas, 100 - tail))


def compare(a: list[float], b: list[float], alpha: float = 0.05) -> Difference:
    low, high = bootstrap_ci(a, b)
    smallest = min_permutation_p(len(a), len(b))
    return Difference(float(np.mean(b) - np.mean(a)), welch_p(a, b), permutation_p(a, b), low, high,
                      smallest, smallest > alpha)
