"""The report's seed statistics against values worked out independently."""
import math

import numpy as np
import pytest

from evaluation.report_stats import (bootstrap_ci, compare, mean_std, min_permutation_p, permutation_p,
                                     welch_p)


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3)), 4)
    mean, std, n = mean_std([5.0])
    assert (mean, n) == (5.0, 1) and math.isnan(std)


def test_welch_against_the_formula():
    a, b = [1.0, 2.0, 3.0, 4.0], [3.0, 5.0, 6.0, 9.0, 10.0]
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 5
    t = (np.mean(b) - np.mean(a)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 4)            # Welch-Satterthwaite
    from scipy.stats import t as student
    assert welch_p(a, b) == pytest.approx(2 * student.sf(abs(t), df), rel=1e-10)
    assert math.isnan(welch_p([1.0], [2.0, 3.0]))


def test_exact_permutation_test_by_hand():
    # a = {1, 2}, b = {3, 4}: of the C(4, 2) = 6 splits, only this one and its mirror have a
    # mean difference of 2 -> p = 2/6
    assert permutation_p([1.0, 2.0], [3.0, 4.0]) == pytest.approx(2 / 6)
    # 3 vs 3 perfectly separated: 2/20 = 0.1, the smallest this design can give
    assert permutation_p([1.0, 2.0, 3.0], [10.0, 11.0, 12.0]) == pytest.approx(0.1)
    assert min_permutation_p(3, 3) == pytest.approx(0.1) and min_permutation_p(5, 5) == pytest.approx(2 / 252)
    # identical groups: every split is at least as extreme as a zero difference
    assert permutation_p([1.0, 1.0], [1.0, 1.0]) == 1.0


def test_n_too_small_is_said_when_no_outcome_reaches_alpha():
    small = compare([1.0, 2.0, 3.0], [10.0, 11.0, 12.0])
    assert small.too_small and small.perm_p == pytest.approx(0.1) and small.delta == pytest.approx(9.0)
    large = compare([1.0, 2.0, 3.0, 1.5, 2.5], [10.0, 11.0, 12.0, 10.5, 11.5])
    assert not large.too_small and large.perm_p == pytest.approx(2 / 252)


def test_bootstrap_interval_brackets_the_difference_and_repeats():
    a, b = [1.0, 1.2, 0.8, 1.1], [2.0, 2.3, 1.9, 2.2]
    low, high = bootstrap_ci(a, b)
    assert low < np.mean(b) - np.mean(a) < high
    assert bootstrap_ci(a, b) == (low, high)                       # seeded
    assert low >= min(b) - max(a) and high <= max(b) - min(a)


# ---- verdicts (judge), each case worked out by hand --------------------------------------------
from scipy import stats  # noqa: E402

from evaluation.report_stats import (CONTRADICTED, HOLDS, NOT_SHOWN, half_width, judge,  # noqa: E402
                                     n_to_settle, welch_interval)


def test_welch_interval_is_scipys_and_matches_its_p():
    a, b = [70.0, 71.5, 72.0, 69.0], [74.0, 75.0, 77.5]
    want = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert welch_interval(a, b) == pytest.approx((want.low, want.high))
    # 3 vs 3, sd 1 each: se = sqrt(2/3) = 0.8165, df 4, t = 2.7764 -> 4 +- 2.2670
    assert welch_interval([70.0, 71.0, 72.0], [74.0, 75.0, 76.0]) == pytest.approx((1.7330, 6.2670), abs=1e-4)
    assert welch_interval([1.0, 1.0], [3.0, 3.0]) == (2.0, 2.0)         # no spread: the point


@pytest.mark.parametrize("control, treatment, direction, min_effect, verdict, need", [
    # +4, interval [1.73, 6.27]: excludes 0, 4 >= 1
    ([70.0, 71.0, 72.0], [74.0, 75.0, 76.0], "higher", 1.0, HOLDS, None),
    # +4 but the claim counts from 5: the interval excludes 0 yet includes 5 -> not shown; to
    # settle it the interval must exclude 5 (margin 1, sd 1): t(2n-2) sqrt(2/n) < 1 first at n = 9
    # (t(16) = 2.120 x 0.471 = 0.999; n = 8: t(14) = 2.145 x 0.5 = 1.07)
    ([70.0, 71.0, 72.0], [74.0, 75.0, 76.0], "higher", 5.0, NOT_SHOWN, 9),
    # +0.5, interval [-1.77, 2.77] holds 0 and 1: not shown; margin 0.5: t(62) x 0.25 = 0.49975
    # < 0.5 at n = 32, t(60) x 0.254 = 0.508 at n = 31
    ([70.0, 71.0, 72.0], [70.5, 71.5, 72.5], "higher", 1.0, NOT_SHOWN, 32),
    # -5, interval [-7.27, -2.73]: the opposite of the claim
    ([70.0, 71.0, 72.0], [65.0, 66.0, 67.0], "higher", 1.0, CONTRADICTED, None),
    # +0.3, sd 0.1: interval [0.073, 0.527] excludes 0 but lies below 1: no effect that counts
    ([70.0, 70.1, 70.2], [70.3, 70.4, 70.5], "higher", 1.0, CONTRADICTED, None),
    # lower is better: cosine 0.91 -> 0.31, by 0.6 >= 0.05
    ([0.90, 0.91, 0.92], [0.30, 0.31, 0.32], "lower", 0.05, HOLDS, None),
    # lower is better but it rose
    ([0.30, 0.31, 0.32], [0.90, 0.91, 0.92], "lower", 0.05, CONTRADICTED, None),
])
def test_verdicts_by_hand(control, treatment, direction, min_effect, verdict, need):
    v = judge(control, treatment, direction, min_effect)
    assert (v.verdict, v.n_to_settle) == (verdict, need)
    assert v.delta == pytest.approx(np.mean(treatment) - np.mean(control))
    assert (v.n_control, v.n_treatment) == (len(control), len(treatment))


def test_one_seed_cannot_tell_whatever_the_difference():
    v = judge([60.0], [80.0], "higher", 1.0)
    assert v.verdict == NOT_SHOWN and v.n_to_settle is None and "one seed" in v.reason
    assert math.isnan(v.ci_low) and v.delta == 20.0


def test_n_to_settle_edges():
    assert n_to_settle(0.0, 1.0, 1.0, 0.0) is None      # no margin ever
    assert n_to_settle(2.0, 0.0, 0.0, 1.0) == 2         # no spread: two seeds settle it
    assert n_to_settle(1e-6, 1.0, 1.0, 0.0) is None     # beyond N_SEARCH_MAX


def test_the_settling_interval_at_the_observed_n_is_the_welch_interval():
    """Unequal spreads (the claims run's LUT attention distance: sd 0.06 vs 0.13): with the
    pooled 2n - 2 degrees of freedom the search said 3 seeds settle it while the 3 seeds' own
    interval did not. Welch's df at every n: at the observed n it is the observed interval, so
    an unsettled claim always asks for more seeds than it has."""
    control, treatment = [14.30, 14.40, 14.56], [14.62, 14.68, 14.73]
    low, high = welch_interval(control, treatment)
    va, vb = np.var(control, ddof=1), np.var(treatment, ddof=1)
    assert half_width(va, vb, 3) == pytest.approx((high - low) / 2)
    v = judge(control, treatment, "higher", 0.5)
    assert v.verdict == NOT_SHOWN and v.n_to_settle > 3
    rng = np.random.default_rng(0)
    for _ in range(200):                    # any unsettled 3 vs 3 asks for more than 3
        c, t = rng.normal(0, rng.uniform(0.1, 2), 3), rng.normal(rng.uniform(-2, 2), rng.uniform(0.1, 2), 3)
        v = judge(list(c), list(t), "higher", 1.0)
        assert v.verdict != NOT_SHOWN or v.n_to_settle is None or v.n_to_settle > 3
