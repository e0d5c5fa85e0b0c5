"""Confidence intervals for the benchmark figures: percentile bootstrap over cases, and Wilson for proportions.

Every figure of a test set is a mean over its cases, so the interval comes from resampling the cases with
replacement. Two models scored on the same cases are compared by resampling the cases once for both
(:func:`paired_bootstrap`), which keeps what the cases have in common out of the interval of the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

#: Bootstrap resamples; the 2.5 and 97.5 percentiles of 10,000 resamples move by well under 0.1 point between seeds.
DEFAULT_RESAMPLES = 10_000


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over the cases (axis 0 of ``values``).

    ``values`` may be (n,) or (n, k): a statistic of several columns per case (an AUC needs labels and scores)
    receives the resampled rows. Returns (nan, nan) for an empty sample.
    """
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    draws = np.array([statistic(values[index]) for index in _indices(len(values), resamples, seed)], dtype=float)
    draws = draws[np.isfinite(draws)]
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def paired_bootstrap(
    first: Sequence[float] | np.ndarray,
    second: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``statistic(first) - statistic(second)`` over the same cases, and its percentile bootstrap interval.

    Both arrays hold one row per case, in the same case order.
    """
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if first.shape[0] != second.shape[0]:
        raise ValueError(f"paired samples need the same cases: {first.shape[0]} against {second.shape[0]}")
    difference = statistic(first) - statistic(second)
    if len(first) == 0:
        return float("nan"), float("nan"), float("nan")
    draws = np.array([statistic(first[i]) - statistic(second[i]) for i in _indices(len(first), resamples, seed)])
    draws = draws[np.isfinite(draws)]
    tail = 100 * (1 - confidence) / 2
    return float(difference), float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (better than the normal approximation near 0 and 1)."""
    if trials <= 0:
        return float("nan"), float("nan")
    from scipy.stats import norm

    z = float(norm.ppf(1 - (1 - confidence) / 2))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(centre - half), float(centre + half)
