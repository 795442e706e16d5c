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
