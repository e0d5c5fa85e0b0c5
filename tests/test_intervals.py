"""Confidence intervals of the benchmark: Wilson against published values, bootstrap against the normal theory."""

from __future__ import annotations

import numpy as np
import pytest

from dscovid.evaluation.intervals import bootstrap_interval, paired_bootstrap, wilson_interval
from dscovid.evaluation.metrics import roc_auc


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Table I: 0/10 -> 0 to 0.2775; 15/148 -> 0.0624 to 0.1605
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert np.isnan(wilson_interval(0, 0)[0])


def test_bootstrap_interval_of_a_mean_follows_the_standard_error():
    values = np.random.default_rng(3).normal(0.7, 0.1, size=2000)
    low, high = bootstrap_interval(values, resamples=4000)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert low == pytest.approx(values.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.15 * half)


def test_paired_bootstrap_removes_what_the_cases_share():
    # Case difficulty varies a lot; the second model is exactly 0.05 worse on every case.
    first = np.random.default_rng(0).uniform(0.3, 0.95, size=200)
    second = first - 0.05
    difference, low, high = paired_bootstrap(first, second, resamples=2000)
    assert difference == pytest.approx(0.05) and low == pytest.approx(0.05) and high == pytest.approx(0.05)
    separate = bootstrap_interval(first, resamples=2000)
    assert separate[1] - separate[0] > 0.03  # the unpaired intervals overlap although every case differs
    with pytest.raises(ValueError, match="same cases"):
        paired_bootstrap(first, second[:10])


def test_bootstrap_of_a_statistic_over_several_columns():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=300)
    scores = labels + rng.normal(0, 1.0, size=300)
    rows = np.column_stack([labels, scores])
    low, high = bootstrap_interval(rows, lambda r: roc_auc(r[:, 0], r[:, 1]), resamples=1000)
    assert low < roc_auc(labels, scores) < high and 0.6 < low and high < 0.9
