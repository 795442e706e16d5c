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


# ---- verdicts: does a claimed difference hold at this n? ---------------------------------------
HOLDS, NOT_SHOWN, CONTRADICTED = "holds", "not shown at this n", "contradicted"
N_SEARCH_MAX = 10_000          # seeds per arm searched for n_to_settle


@dataclass
class Verdict:
    """A claimed effect of ``treatment`` over ``control``, in the claim's direction (``effect``
    > 0 is the claimed way), judged by its 95% Welch interval against ``min_effect``."""
    delta: float               # mean(treatment) - mean(control), metric units
    ci_low: float              # Welch t interval of delta at ``level``
    ci_high: float
    welch_p: float
    perm_p: float
    n_control: int
    n_treatment: int
    verdict: str               # HOLDS | NOT_SHOWN | CONTRADICTED
    reason: str
    n_to_settle: int | None    # seeds per arm at which the observed means and spread would settle it


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float]:
    """Interval of mean(b) - mean(a) from Welch's t (Welch-Satterthwaite degrees of freedom):
    the one that matches ``welch_p`` (it excludes 0 exactly when p < 1 - level). With 3 seeds
    a bootstrap interval is far too narrow (it never leaves the observed range); this one is
    honest about the t distribution's tails. No spread in either group: the point itself."""
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    delta = float(b_.mean() - a_.mean())
    va, vb = a_.var(ddof=1) / len(a_), b_.var(ddof=1) / len(b_)
    se = math.sqrt(va + vb)
    if se == 0:
        return delta, delta
    df = (va + vb) ** 2 / (va ** 2 / (len(a_) - 1) + vb ** 2 / (len(b_) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return delta - half, delta + half


def half_width(var_a: float, var_b: float, n: int, level: float = 0.95) -> float:
    """Half-width of the Welch interval with ``n`` seeds in each arm whose values have sample
    variances ``var_a`` and ``var_b``: t(df) * sqrt((var_a + var_b) / n), Welch-Satterthwaite
    df = (var_a + var_b)^2 (n - 1) / (var_a^2 + var_b^2) (2n - 2 for equal variances). At the
    observed n it is exactly ``welch_interval``'s."""
    spread = var_a + var_b
    df = spread ** 2 * (n - 1) / (var_a ** 2 + var_b ** 2)
    return float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(spread / n)


def n_to_settle(effect: float, var_a: float, var_b: float, min_effect: float,
                level: float = 0.95) -> int | None:
    """The smallest n per arm at which the Welch interval ``effect ± half_width(n)`` would
    settle the claim: exclude 0 when ``effect >= min_effect`` (holds), or exclude
    ``min_effect`` when ``effect < min_effect`` (contradicted). The observed means and
    variances taken as the truth, with no margin for power: a design with 80% power needs about
    twice as many. None when no n settles it (an effect of exactly 0 = min_effect) or more than
    N_SEARCH_MAX would."""
    margin = effect if effect >= min_effect else min_effect - effect
    if margin <= 0:
        return None
    if var_a + var_b == 0:
        return 2
    for n in range(2, N_SEARCH_MAX + 1):
        if half_width(var_a, var_b, n, level) < margin:
            return n
    return None


def judge(control: list[float], treatment: list[float], direction: str = "higher",
          min_effect: float = 0.0, alpha: float = 0.05) -> Verdict:
    """The claim "treatment beats control by at least ``min_effect``" at the (1 - alpha)
    interval: **holds** when the interval excludes 0 on the claimed side and the observed
    effect is at least ``min_effect``; **contradicted** when the interval lies below
    ``min_effect`` (no effect that counts, or the opposite one); else **not shown at this n**.
    With one value in an arm there is no spread to judge by: not shown, n unknown."""
    delta = float(np.mean(treatment) - np.mean(control))
    perm = permutation_p(control, treatment)
    if len(control) < 2 or len(treatment) < 2:
        return Verdict(delta, math.nan, math.nan, math.nan, perm, len(control), len(treatment),
                       NOT_SHOWN, "one seed: no spread to judge by (run 3+ seeds)", None)
    low, high = welch_interval(control, treatment, 1 - alpha)
    sign = 1.0 if direction == "higher" else -1.0
    effect, lo, hi = sign * delta, *sorted((sign * low, sign * high))
    need = n_to_settle(effect, float(np.var(control, ddof=1)), float(np.var(treatment, ddof=1)),
                       min_effect, 1 - alpha)
    better = "higher" if direction == "higher" else "lower"
    if lo > 0 and effect >= min_effect:
        verdict, reason = HOLDS, f"{better} by {abs(delta):.3g} >= {min_effect:g}, interval excludes 0"
    elif hi < 0:
        verdict, reason = CONTRADICTED, "the opposite: the interval is on the other side of 0"
    elif hi < min_effect:
        verdict, reason = CONTRADICTED, f"the interval excludes an effect of {min_effect:g} or more"
    elif effect >= min_effect:
        verdict, reason = NOT_SHOWN, "the effect counts, but the interval includes 0"
    elif lo > 0:
        verdict, reason = NOT_SHOWN, (f"an effect above 0 but below {min_effect:g}; the interval "
                                      f"includes {min_effect:g}")
    else:
        verdict, reason = NOT_SHOWN, f"the interval includes both 0 and {min_effect:g}"
    return Verdict(delta, low, high, welch_p(control, treatment), perm, len(control), len(treatment),
                   verdict, reason, None if verdict != NOT_SHOWN else need)
