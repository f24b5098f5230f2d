"""The edit-with-report pipelines: what they refuse, they refuse before the first evaluation (on a
real model that is minutes of generation)."""

from __future__ import annotations

import pytest

from app.ml.corpus import Document
from app.ml.dinm import DinmParams
from app.ml.errors import InputError
from app.ml.judges import Verdict
from app.ml.pipeline import dinm_with_report, unlearn_with_report
from app.ml.unlearn_params import UnlearnParams
from tests.factories import tiny_model
from tests.ml.test_dinm import INSTANCE


class CountingJudge:
    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def judge(self, prompts, responses, *, harmful: bool = True):
        self.calls += 1
        return [Verdict(unsafe=False, score=0.0, refused=True) for _ in responses]


def test_a_dinm_layer_the_model_lacks_fails_before_the_evaluation():
    lm = tiny_model("llama")  # 4 layers
    stages: list[str] = []
    judge = CountingJudge()
    with pytest.raises(InputError, match="layer 4 is out of range"):
        dinm_with_report(
            lm, [INSTANCE], DinmParams(layer=4, steps=1), judge=judge, max_new_tokens=2,
            progress=lambda stage, _f: stages.append(stage),
        )  # fmt: skip
    assert stages == [] and judge.calls == 0


def test_unlearning_layers_the_model_lacks_fail_before_the_evaluation():
    lm = tiny_model("llama")
    stages: list[str] = []
    with pytest.raises(InputError, match="layer 9 is out of range"):
        unlearn_with_report(
            lm, [Document("some text to forget")], None, "ga",
            UnlearnParams(layers=[0, 9], steps=1), progress=lambda stage, _f: stages.append(stage),
        )  # fmt: skip
    assert stages == []


def test_the_before_edit_evaluation_is_a_stage_from_its_start_with_progress_inside():
    lm = tiny_model("llama")
    events: list[tuple[str, float]] = []
    dinm_with_report(
        lm, [INSTANCE], DinmParams(steps=1), judge=CountingJudge(), max_new_tokens=8,
        batch_size=16, progress=lambda stage, fraction: events.append((stage, fraction)),
    )  # fmt: skip
    assert events[0] == ("eval-before", 0.0)  # before its (only) generation batch
    stages = list(dict.fromkeys(stage for stage, _ in events))
    # The default preset (broad) prepares its packaged sets between locating and tuning.
    assert stages == ["eval-before", "locate", "prepare", "tune", "eval-after"], stages
    for stage in ("eval-before", "eval-after"):
        inside = {f for s, f in events if s == stage and 0 < f < 1}
        assert len(inside) >= 3, (stage, events)
