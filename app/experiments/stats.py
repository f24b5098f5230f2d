"""Interval estimates for experiment results (pure Python).

- One proportion: the Wilson score interval (Wilson 1927), which stays inside [0, 1] and keeps
  close to its nominal coverage for small counts and rates near 0 or 1, unlike the Wald interval.
- A difference of two independent proportions: Newcombe's hybrid score interval (Newcombe 1998,
  method 10), built from the two Wilson intervals.
- Percentiles: linear interpolation between order statistics (numpy's default, "type 7").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

CONFIDENCE = 0.95


def z_value(confidence: float = CONFIDENCE) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


@dataclass(frozen=True)
class Interval:
    estimate: float | None  # None when there is no observation
    low: float | None
    high: float | None


EMPTY = Interval(None, None, None)


def wilson(successes: int, trials: int, confidence: float = CONFIDENCE) -> Interval:
    """The rate `successes / trials` with its Wilson score interval."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes}/{trials}")
    if trials == 0:
        return EMPTY
    z = z_value(confidence)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def newcombe(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int,
    confidence: float = CONFIDENCE,
) -> Interval:  # fmt: skip
    """The difference of rates a - b with Newcombe's hybrid score interval."""
    a = wilson(successes_a, trials_a, confidence)
    b = wilson(successes_b, trials_b, confidence)
    if a.estimate is None or b.estimate is None:
        return EMPTY
    assert a.low is not None and a.high is not None and b.low is not None and b.high is not None
    difference = a.estimate - b.estimate
    below = math.sqrt((a.estimate - a.low) ** 2 + (b.high - b.estimate) ** 2)
    above = math.sqrt((a.high - a.estimate) ** 2 + (b.estimate - b.low) ** 2)
    return Interval(difference, max(-1.0, difference - below), min(1.0, difference + above))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0-100) of `values`, None when there are none."""
    if not 0 <= q <= 100:
        raise ValueError(f"a percentile is between 0 and 100, not {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
