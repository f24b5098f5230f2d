"""DINM end to end on the real demo model (SmolLM2-135M-Instruct), judged by the offline judge."""

import json
from pathlib import Path

import pytest

from app.ml.deltas import applied
from app.ml.dinm import DinmParams, dinm_edit
from app.ml.generation import generate
from app.ml.judges import OfflineJudge
from app.ml.models import load_model
from app.ml.safeedit import find_case, load_instances

ROOT = Path(__file__).resolve().parents[2]
GENERAL = json.loads((ROOT / "tests" / "data" / "general_questions.json").read_text())
# The general questions with a one-sentence answer: these must come back word for word. The
# longer answers keep their fact but may drift after it (an edit of the last layer moves
# near-tied tokens), which is what the facts check below allows.
SHORT = ["What is the capital of France?", "How many days are there in a week?",
         "What is the capital of Germany?"]  # fmt: skip
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


def test_edit_makes_an_unsafe_answer_safe_and_keeps_general_answers(demo):
    instance = find_case(load_instances(ROOT / "examples" / "safeedit_example.json"), "example-1")
    questions = [g["question"] for g in GENERAL]
    judge = OfflineJudge()
    prompt = [instance.adversarial_prompt]

    (before,) = generate(demo, prompt, max_new_tokens=48)
    assert judge.judge(prompt, [before.text])[0].unsafe, before.text
    general_before = [g.text for g in generate(demo, questions, max_new_tokens=24)]

    # The published algorithm: its edit leaves the short answers word for word. The "guarded"
    # preset changes the French one on this instance (see README, "DINM presets").
    result = dinm_edit(demo, instance, DinmParams(preset="paper"))
    with applied(demo.model, [result.delta]):
        (after,) = generate(demo, prompt, max_new_tokens=48)
        general_after = [g.text for g in generate(demo, questions, max_new_tokens=24)]

    assert not judge.judge(prompt, [after.text])[0].unsafe, after.text
    for question, old, new in zip(questions, general_before, general_after, strict=True):
        if question in SHORT:
            assert new == old, question
    for item, new in zip(GENERAL, general_after, strict=True):
        assert item["fact"].lower() in new.lower(), (item["question"], new)
    # The delta is reverted: the base model answers as before again.
    assert generate(demo, prompt, max_new_tokens=48)[0].text == before.text
