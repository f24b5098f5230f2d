"""The interval estimates against references: scipy's Wilson interval, the published table of
Newcombe (1998) for the difference of two proportions, numpy's percentiles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from app.experiments.stats import newcombe, percentile, wilson

# Newcombe, "Interval estimation for the difference between independent proportions:
# comparison of eleven methods", Statistics in Medicine 17 (1998), Table II, method 10.
NEWCOMBE_TABLE_II = [
    ((56, 70, 48, 80), (0.0524, 0.3339)),
    ((9, 10, 3, 10), (0.1705, 0.8090)),
    ((6, 7, 2, 7), (0.0582, 0.8062)),
    ((5, 56, 0, 29), (-0.0381, 0.1926)),
    ((0, 10, 0, 20), (-0.1611, 0.2775)),
    ((0, 10, 0, 10), (-0.2775, 0.2775)),
    ((10, 10, 0, 20), (0.6791, 1.0000)),
    ((10, 10, 0, 10), (0.6075, 1.0000)),
]


@pytest.mark.parametrize(
    ("successes", "trials"), [(0, 1), (1, 1), (0, 10), (3, 10), (81, 263), (500, 1000), (7, 9)]
)
def test_wilson_matches_scipy(successes: int, trials: int):
    interval = wilson(successes, trials)
    reference = binomtest(successes, trials).proportion_ci(0.95, method="wilson")
    assert interval.estimate == successes / trials
    assert interval.low == pytest.approx(reference.low, abs=1e-12)
    assert interval.high == pytest.approx(reference.high, abs=1e-12)


def test_wilson_at_another_confidence_and_without_trials():
    reference = binomtest(4, 20).proportion_ci(0.9, method="wilson")
    assert wilson(4, 20, 0.9).low == pytest.approx(reference.low, abs=1e-12)
    assert wilson(0, 0).estimate is None and wilson(0, 0).low is None
    with pytest.raises(ValueError):
        wilson(3, 2)


@pytest.mark.parametrize(("counts", "expected"), NEWCOMBE_TABLE_II)
def test_newcombe_matches_the_published_table(counts, expected):
    interval = newcombe(*counts)
    a, n, b, m = counts
    assert interval.estimate == pytest.approx(a / n - b / m)
    assert (round(interval.low, 4), round(interval.high, 4)) == expected


def test_newcombe_is_antisymmetric_and_empty_without_data():
    forward, backward = newcombe(9, 10, 3, 10), newcombe(3, 10, 9, 10)
    assert forward.low == pytest.approx(-backward.high)
    assert forward.high == pytest.approx(-backward.low)
    assert newcombe(1, 2, 0, 0).estimate is None


def test_percentiles_match_numpy():
    values = [5.0, 1.0, 9.5, 3.25, 7.0, 2.0, 8.0]
    for q in (0, 5, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([], 50) is None
    assert percentile([4.0], 95) == 4.0
