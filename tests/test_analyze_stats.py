"""Statistics of the analysis package against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analyze.aggregate import AlignedSeeds, Band, band_limits
from analyze.stats import mean_std, performance_profile, times_to_target


def test_mean_std_uses_sample_std_and_ignores_non_finite() -> None:
    result = mean_std([1.0, 2.0, 4.0, float("nan")])
    assert result.n == 3
    assert result.mean == pytest.approx(7 / 3)
    assert result.std == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    single = mean_std([5.0])
    assert single.n == 1 and math.isnan(single.std)


def test_band_limits() -> None:
    values = np.array([[1.0, 2.0], [2.0, 4.0], [4.0, 9.0]])
    lo, hi = band_limits(values, Band.MINMAX)
    np.testing.assert_array_equal(lo, [1.0, 2.0])
    np.testing.assert_array_equal(hi, [4.0, 9.0])
    lo, hi = band_limits(values, Band.CI95)
    half = stats.t.ppf(0.975, 2) * values.std(axis=0, ddof=1) / math.sqrt(3)
    np.testing.assert_allclose(hi - values.mean(0), half)
    np.testing.assert_allclose(values.mean(0) - lo, half)
    lo, hi = band_limits(values[:1], Band.CI95)
    np.testing.assert_array_equal(lo, hi)


def test_times_to_target_on_mean_curves() -> None:
    steps = np.arange(4)
    base = AlignedSeeds(
        seeds=(0, 1),
        steps=steps,
        columns={
            "loss": np.array([[4.0, 3.0, 2.5, 2.0], [4.0, 3.5, 3.0, 3.0]]),
            "wall_time_s": np.array([[0.0, 1.0, 2.0, 3.0], [0.0, 1.2, 2.2, 3.2]]),
            "epoch": np.tile(steps.astype(float), (2, 1)),
        },
    )
    fast = AlignedSeeds(
        seeds=(0, 1),
        steps=steps,
        columns={
            "loss": np.array([[4.0, 2.0, 1.0, 1.0], [4.0, 3.0, 2.0, 1.0]]),
            "wall_time_s": np.array([[0.0, 2.0, 4.0, 6.0], [0.0, 2.0, 4.0, 6.0]]),
            "epoch": np.tile(steps.astype(float), (2, 1)),
        },
    )
    target, found = times_to_target(
        {"base": base, "fast": fast}, baseline="base", metric="loss", n_bootstrap=300
    )
    assert target == pytest.approx(2.5)
    assert found["base"].epochs.value == 3 and found["base"].wall_s.value == pytest.approx(3.1)
    assert found["fast"].epochs.value == 1  # mean curve 4, 2.5, ...: reaches 2.5 at step 1
    assert found["fast"].wall_s.value == pytest.approx(2.0)
    assert found["fast"].speedup_wall.value == pytest.approx(3.1 / 2.0)
    assert found["fast"].speedup_epochs.value == pytest.approx(3.0)
    assert found["base"].seeds_reaching == 1 and found["fast"].seeds_reaching == 2
    low, high = found["fast"].speedup_epochs.low, found["fast"].speedup_epochs.high
    assert low <= 3.0 <= high
    _, fixed = times_to_target(
        {"base": base, "fast": fast}, baseline="base", metric="loss", target=0.5, n_bootstrap=10
    )
    assert math.isinf(fixed["fast"].wall_s.value)


def test_performance_profile_fractions() -> None:
    times = pd.DataFrame(
        {"a": [1.0, 10.0, np.inf], "b": [2.0, 5.0, 3.0], "c": [5.0, np.nan, 3.5]},
        index=["p1", "p2", "p3"],
    )
    profile = performance_profile(times, r_max=4.0, points=301)
    # ratios: a [1, 2, inf], b [2, 1, 1], c [5 -> unsolved, unsolved, 7/6]
    at = {t: int(np.argmin(np.abs(profile.tau - t))) for t in (1.0, 1.5, 2.0, 4.0)}
    assert profile.fractions["a"][at[1.0]] == pytest.approx(1 / 3)
    assert profile.fractions["a"][at[2.0]] == pytest.approx(2 / 3)
    assert profile.fractions["b"][at[1.0]] == pytest.approx(2 / 3)
    assert profile.fractions["b"][at[2.0]] == pytest.approx(1.0)
    assert profile.fractions["c"][at[1.0]] == 0.0
    assert profile.fractions["c"][at[1.5]] == pytest.approx(1 / 3)
    assert profile.fractions["c"][at[4.0]] == pytest.approx(1 / 3)
