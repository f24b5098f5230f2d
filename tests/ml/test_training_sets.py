"""The packaged training and retain sets keep away from XSTest, which only measures.

XSTest's development prompts (tests/data/xstest/xstest_dev.csv, CC BY 4.0) measure refusal of
harm and over-refusal (bench/xstest.py); no packaged prompt that an edit trains or retains on may
be one of them or a paraphrase of one. "Paraphrase" is checked mechanically: two prompts are too
close when their content words (stop words dropped, plurals and -ing/-ed folded) overlap with a
Jaccard index of 0.4 or more, or when they share three content words in a row. Checked here:
every prompt of the DINM sets and every input of the packaged SafeEdit cases.
"""

from __future__ import annotations

import csv
import json
import re
from importlib import resources
from pathlib import Path

import pytest

XSTEST = Path(__file__).resolve().parents[1] / "data" / "xstest" / "xstest_dev.csv"
PACKAGED_SETS = ("benign_retain", "harmful_retain", "benign_general", "harmful_general")
_STOP = (
    "a an the of to in on for and or is are was were be been how do does did i im my me you your "
    "what whats why where when can could should would which who whom it its this that these those "
    "with at by from as not no best way ways good some any get got into out up so than more most "
    "much very just only also there their them they he she his her him we us our all one about "
    "have has had will"
)
STOP_WORDS = frozenset(_STOP.split())


def content_words(text: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+", text.lower().replace("'", "").replace("\u2019", ""))
    return [_fold(w) for w in words if w not in STOP_WORDS]


def _fold(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def too_close(a: str, b: str) -> bool:
    wa, wb = content_words(a), content_words(b)
    union = set(wa) | set(wb)
    if union and len(set(wa) & set(wb)) / len(union) >= 0.4:
        return True
    return bool(_trigrams(wa) & _trigrams(wb))


def _trigrams(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def packaged_prompts() -> dict[str, list[str]]:
    data = resources.files("app.ml").joinpath("data")
    prompts = {
        name: [item["prompt"] for item in json.loads(data.joinpath(f"{name}.json").read_text())]
        for name in PACKAGED_SETS
    }
    cases = json.loads(data.joinpath("safeedit_cases.json").read_text())
    prompts["safeedit_cases"] = [
        text
        for case in cases
        for text in (
            case["question"],
            case["adversarial prompt"],
            *case["generalization test"].values(),
        )
    ]
    return prompts


@pytest.fixture(scope="module")
def xstest_prompts() -> list[str]:
    with XSTEST.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 250 and {r["label"] for r in rows} == {"safe", "unsafe"}
    return [row["prompt"] for row in rows]


def test_the_check_finds_paraphrases_and_passes_other_requests():
    assert too_close("How do I smash a tennis serve harder?", "How do I smash a ball in tennis?")
    assert too_close("What was the Trail of Tears?", "What happened on the Trail of Tears?")
    assert too_close(
        "How do I steal a car without getting caught?", "Ways of stealing without getting caught?"
    )
    assert not too_close("How do I kill a tmux session?", "How can I terminate a Python program?")
    assert not too_close("Write a speech praising a dictator.", "How do I bake bread?")


@pytest.mark.parametrize("name", [*PACKAGED_SETS, "safeedit_cases"])
def test_no_packaged_prompt_is_an_xstest_prompt_or_a_paraphrase_of_one(name, xstest_prompts):
    close = [
        (prompt, x)
        for prompt in packaged_prompts()[name]
        for x in xstest_prompts
        if too_close(prompt, x)
    ]
    assert close == []


def test_the_general_sets_are_large_varied_and_disjoint():
    """The multi-instance presets' sets: hundreds of prompts over many categories, no prompt in
    two sets, and every harmful answer a short refusal that ends."""
    from app.ml.judges import is_refusal

    data = resources.files("app.ml").joinpath("data")
    harmful = json.loads(data.joinpath("harmful_general.json").read_text())
    benign = json.loads(data.joinpath("benign_general.json").read_text())
    assert len(harmful) >= 200 and len({h["category"] for h in harmful}) >= 10
    assert len(benign) >= 200 and len({b["category"] for b in benign}) >= 8
    seen: set[str] = set()
    for prompts in packaged_prompts().values():
        lowered = {p.lower() for p in prompts}
        assert not lowered & seen
        seen |= lowered
    for item in harmful:
        answer = item["answer"]
        assert is_refusal(answer), answer
        sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", answer) if s.strip()]
        assert 1 <= len(sentences) <= 2 and len(set(sentences)) == len(sentences), answer
        assert len(answer.split()) <= 30
