"""The statistics shared by the experiments (sgdnoise._stats)."""

from __future__ import annotations

import math

import pytest

from sgdnoise._stats import curve_over_seeds, finite_min, is_finite, loglog_slope, mean_std, stat


def test_mean_std_skips_missing_and_non_finite_values() -> None:
    assert mean_std([1.0, None, 3.0, math.nan, math.inf]) == (2.0, math.sqrt(2.0))
    assert mean_std([4.0]) == (4.0, None)
    assert mean_std([None, math.nan]) == (None, None)
    assert math.isnan(mean_std([], empty=math.nan)[0])
    assert not is_finite(None) and not is_finite(math.inf) and is_finite(0)


def test_stat_keeps_every_value_and_counts_the_finite_ones() -> None:
    st = stat([1.0, None, 2.0])
    assert st == {"mean": 1.5, "std": pytest.approx(math.sqrt(0.5)), "n": 2,
                  "values": [1.0, None, 2.0]}  # fmt: skip
    assert finite_min([None, 3.0, math.nan, -1.0]) == -1.0 and math.isnan(finite_min([None]))


def test_loglog_slope_of_a_power_law_and_degenerate_inputs() -> None:
    xs = [10.0, 100.0, 1000.0]
    assert loglog_slope(xs, [x**0.5 for x in xs]) == pytest.approx(0.5)
    assert loglog_slope([1.0, 2.0], [1.0, -1.0]) is None  # one positive point
    assert loglog_slope([3.0, 3.0], [1.0, 2.0]) is None  # one distinct x


def test_curve_over_seeds_averages_the_measured_rows() -> None:
    rows = [
        [{"iteration": 0, "a": 1.0, "a_stderr": 0.3}, {"iteration": 5}, {"iteration": 9, "a": 3.0, "a_stderr": 0.4}],
        [{"iteration": 0, "a": 3.0, "a_stderr": 0.4}, {"iteration": 9, "a": 5.0, "a_stderr": 0.3}],
    ]  # fmt: skip
    c = curve_over_seeds(rows, "a")
    assert c["iteration"] == [0, 9] and c["mean"] == [2.0, 4.0]
    assert c["std"] == [pytest.approx(math.sqrt(2.0))] * 2
    assert c["stderr"] == [pytest.approx(0.25)] * 2
    assert curve_over_seeds([], "a") == {"iteration": [], "mean": [], "std": []}
