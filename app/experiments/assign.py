"""Which arm serves a request: a stable hash of (experiment, user) when the request names a
`user`, so one user always sees the same arm (across requests, processes and restarts), and a
fresh random draw otherwise. Weights are relative (50/50, 1/3, 90/10 ...)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

_HASH_DIGITS = 15  # 60 bits of the digest: finer than any weight split anyone asks for


@dataclass(frozen=True)
class Arm:
    model: str
    weight: float


def user_point(experiment: str, user: str) -> float:
    """A point in [0, 1) fixed by the experiment and the user (sha256: not Python's salted
    hash, which changes from process to process)."""
    digest = hashlib.sha256(f"{experiment}\x00{user}".encode()).hexdigest()
    return int(digest[:_HASH_DIGITS], 16) / 16**_HASH_DIGITS


def pick(arms: Sequence[Arm], point: float) -> Arm:
    """The arm whose share of the cumulative weights holds `point` (in [0, 1))."""
    total = sum(arm.weight for arm in arms)
    if total <= 0:
        raise ValueError("the arms' weights must add up to more than 0")
    threshold = point * total
    cumulative = 0.0
    for arm in arms:
        cumulative += arm.weight
        if threshold < cumulative:
            return arm
    return next(arm for arm in reversed(arms) if arm.weight > 0)  # rounding at the top end


def assign(
    experiment: str, arms: Sequence[Arm], user: str | None, rng: random.Random | None = None
) -> Arm:
    point = user_point(experiment, user) if user else (rng or random).random()
    return pick(arms, point)


def user_hash(user: str | None) -> str | None:
    """What the store keeps of a user: a hash, enough to count users, not to name them."""
    return hashlib.sha256(user.encode()).hexdigest() if user else None
