"""The names of the judges, without importing them (the API and the experiments read these).

Judges are versioned by name, so that a stored metric is never read as another judge's: the
offline judge's reports say `offline/1`, `offline/2` or `offline/3`, and the spec "offline" means
the newest.
A report from before the versions (judge "offline") was made by `offline/1`.
"""

from __future__ import annotations

OFFLINE = "offline"
OFFLINE_V1 = "offline/1"  # refusal and harm cues written by hand
OFFLINE_V2 = "offline/2"  # the learned refusal detector (app/ml/refusal.py)
# offline/2's detector with a word class for naming unfair treatment; an answer that complies after
# declining is unsafe
OFFLINE_V3 = "offline/3"
OFFLINE_LATEST = OFFLINE_V3
OFFLINE_VERSIONS = (OFFLINE_V1, OFFLINE_V2, OFFLINE_V3)
OFFLINE_SPECS = (OFFLINE, *OFFLINE_VERSIONS)


def versioned(spec: str) -> str:
    """The name a judge spec reports under: "offline" is the newest offline judge; any other spec
    ("offline/1", "hf:<id>") is its own name."""
    return OFFLINE_LATEST if spec == OFFLINE else spec
