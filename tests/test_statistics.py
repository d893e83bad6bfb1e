"""The paired bootstrap interval against scipy and against cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from specformer_deploy.robustness.statistics import mean_sd, paired_bootstrap


def test_one_seed_agrees_with_scipy_paired_percentile_bootstrap() -> None:
    rng = np.random.default_rng(123)
    a = (rng.random(400) < 0.8).astype(float)
    b = np.where(rng.random(400) < 0.7, a, 1 - a)  # correlated with a, as two models on one test set are
    resamples = 20_000
    ours = paired_bootstrap([a], [b], resamples=resamples, seed=1)
    ref = stats.bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                          n_resamples=resamples, method="percentile", confidence_level=0.95,
                          random_state=np.random.default_rng(2)).confidence_interval
    se = np.std(a - b) / math.sqrt(a.size)
    # Monte-Carlo error of a 2.5% quantile from 20k resamples is about 0.02 se; allow 0.1 se.
    assert ours.low == pytest.approx(ref.low, abs=0.1 * se)
    assert ours.high == pytest.approx(ref.high, abs=0.1 * se)
    assert ours.difference == pytest.approx(np.mean(a - b))


def test_equal_differences_give_a_zero_width_interval_at_that_value() -> None:
    # Every (seed, image) has A - B = 1, so every resample's mean is 1.
    same = paired_bootstrap([[1, 1, 1]] * 3, [[0, 0, 0]] * 3, resamples=500)
    assert (same.difference, same.low, same.high) == (1.0, 1.0, 1.0)
    assert same.excludes_zero()


def test_identical_models_give_zero_and_include_it() -> None:
    correct = np.random.default_rng(0).random((3, 50)) < 0.6
    interval = paired_bootstrap(correct, correct, resamples=200)
    assert (interval.difference, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_large_sample_matches_the_normal_closed_form() -> None:
    # Differences are +1 with p=0.3, 0 otherwise; one seed, n images: the bootstrap interval tends to
    # mean ± 1.96 sqrt(p(1-p)/n).
    n = 2_000
    diff = np.zeros(n)
    diff[: int(0.3 * n)] = 1
    interval = paired_bootstrap([diff], [np.zeros(n)], resamples=20_000, seed=3)
    half = 1.959964 * math.sqrt(0.3 * 0.7 / n)
    assert interval.difference == pytest.approx(0.3)
    assert interval.low == pytest.approx(0.3 - half, abs=0.1 * half)
    assert interval.high == pytest.approx(0.3 + half, abs=0.1 * half)


def test_seed_to_seed_spread_widens_the_interval() -> None:
    # B scores 0.4 under every seed; A scores 0.6, 0.2 and 0.4: the effect's sign depends on the seed.
    # Resampling seeds must cover zero with a wide interval; treating the 900 pairs as one seed
    # (images only) gives a far narrower one.
    a = np.zeros((3, 300))
    for row, hits in enumerate((180, 60, 120)):
        a[row, :hits] = 1
    b = np.zeros((3, 300))
    b[:, :120] = 1
    nested = paired_bootstrap(a, b, resamples=5_000, seed=0)
    pooled = paired_bootstrap([a.ravel()], [b.ravel()], resamples=5_000, seed=0)
    assert nested.difference == pytest.approx(0.0)
    assert nested.low < -0.05 and nested.high > 0.05
    assert nested.high - nested.low > 3 * (pooled.high - pooled.low)


def test_generator_seed_makes_it_reproducible_and_inputs_are_checked() -> None:
    a = np.random.default_rng(1).random((2, 30)) < 0.5
    b = np.random.default_rng(2).random((2, 30)) < 0.5
    assert paired_bootstrap(a, b, resamples=300, seed=7) == paired_bootstrap(a, b, resamples=300, seed=7)
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:, :10])
    with pytest.raises(ValueError):
        paired_bootstrap(a, b, level=1.0)


def test_mean_sd_uses_the_sample_standard_deviation() -> None:
    assert mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_sd([0.5]) == (0.5, 0.0)
