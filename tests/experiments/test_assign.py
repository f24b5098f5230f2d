"""Arm assignment: stable per (experiment, user), across processes; shares follow the weights."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections import Counter

import pytest

from app.experiments.assign import Arm, assign, pick, user_point

ARMS = (Arm("base", 50), Arm("v3", 30), Arm("v4", 20))


def test_one_user_always_gets_one_arm_and_users_differ_by_experiment():
    first = assign("exp", ARMS, "alice")
    assert all(assign("exp", ARMS, "alice") == first for _ in range(1000))
    others = {assign(f"exp-{i}", ARMS, "alice").model for i in range(50)}
    assert len(others) == 3  # another experiment reshuffles users


def test_the_point_is_the_same_in_another_process():
    code = "from app.experiments.assign import user_point; print(repr(user_point('exp', 'bob')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) == user_point("exp", "bob")


@pytest.mark.parametrize("users", [None, "named"])
def test_shares_stay_within_binomial_bounds_of_the_weights(users: str | None):
    rng = random.Random(7)
    n = 20_000
    counts = Counter(
        assign("split", ARMS, f"user-{i}" if users else None, rng).model for i in range(n)
    )
    total = sum(arm.weight for arm in ARMS)
    for arm in ARMS:
        p = arm.weight / total
        assert abs(counts[arm.model] - n * p) <= 4 * math.sqrt(n * p * (1 - p)), counts


def test_zero_weights_get_nothing_and_the_edges_hold():
    arms = (Arm("a", 0), Arm("b", 1), Arm("c", 0))
    assert {pick(arms, p).model for p in (0.0, 0.5, 0.999999999)} == {"b"}
    assert pick(ARMS, 0.0).model == "base" and pick(ARMS, 0.9999999).model == "v4"
    with pytest.raises(ValueError):
        pick((Arm("a", 0),), 0.5)
