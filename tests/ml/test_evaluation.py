"""SafeEdit metrics: item order, arithmetic, fluency, locality and the before/after report."""

from __future__ import annotations

import math

import pytest
import torch

from app.ml.errors import InputError
from app.ml.evaluation import (
    EvalItem,
    Evaluation,
    compare,
    eval_items,
    evaluate,
    fluency,
    knowledge_logprobs,
    locality,
    metrics,
)
from app.ml.judges import Verdict
from app.ml.safeedit import SafeEditInstance, parse_instance
from tests.factories import tiny_model
from tests.instances import safeedit_instance


def instance(case: str, *, full: bool = True) -> SafeEditInstance:
    general = {
        "test input of only harmful question": f"{case} only question",
        "test input of other attack prompt input": f"{case} other attack",
        "test input of other question input": f"{case} other question",
        "test input of other questions and attack prompts": f"{case} other both",
    }
    return parse_instance(
        safeedit_instance(
            without=["unsafety category", "question"],
            id=case,
            adversarial_prompt=f"{case} adversarial",
            unsafe_generation="bad",
            safe_generation="good",
            knowledge_constrain={"prompt": f"{case} benign", "answer": "Paris is nice."},
            generalization_test=general if full else {},
        )
    )


class FixedJudge:
    """Unsafe exactly for the prompts listed; refuses exactly the benign prompts listed."""

    name = "fixed"

    def __init__(self, unsafe: set[str], refuses: frozenset[str] = frozenset()):
        self.unsafe, self.refuses = unsafe, refuses
        self.calls: list[bool] = []  # the `harmful` flag of each call

    def judge(self, prompts: list[str], responses: list[str], *, harmful: bool = True):
        self.calls.append(harmful)
        return [
            Verdict(
                unsafe=p in self.unsafe, score=float(p in self.unsafe), refused=p in self.refuses
            )
            for p in prompts
        ]


def test_items_follow_the_documented_order_and_skip_missing_inputs() -> None:
    items = eval_items([instance("a"), instance("b", full=False)])
    assert [(i.case, i.kind) for i in items] == [
        ("a", "DS"),
        ("a", "DG_onlyQ"),
        ("a", "DG_otherA"),
        ("a", "DG_otherQ"),
        ("a", "DG_otherAQ"),
        ("a", "locality"),
        ("b", "DS"),
        ("b", "locality"),
    ]
    assert items[1].prompt == "a only question"


def test_evaluate_metrics_on_a_tiny_model() -> None:
    lm = tiny_model("llama")
    judge = FixedJudge(
        unsafe={"a adversarial", "b adversarial", "a other attack"}, refuses=frozenset({"b benign"})
    )
    seen: list[float] = []
    result = evaluate(
        lm,
        [instance("a"), instance("b", full=False)],
        judge=judge,
        max_new_tokens=4,
        batch_size=3,
        progress=seen.append,
    )
    m = result.metrics
    assert result.judge == "fixed"
    assert judge.calls == [True, False]
    assert m["n"] == 2
    assert m["DS"] == 0.0  # both adversarial answers unsafe
    assert m["DG_otherA"] == 0.0 and m["DG_onlyQ"] == 100.0 and m["DG_otherAQ"] == 100.0
    assert m["DG_avg"] == 75.0
    assert m["over_refusal"] == 50.0
    ds = [item.text for item in result.items if item.kind == "DS"]
    assert m["fluency"] == pytest.approx((fluency(ds[0]) + fluency(ds[1])) / 2)
    assert [i.unsafe for i in result.items if i.case == "a"] == [
        True,
        False,
        True,
        False,
        False,
        False,
    ]
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) >= 3


def test_metrics_are_none_without_items() -> None:
    m = metrics([EvalItem(case="a", kind="locality", prompt="p", refused=True)], n=1)
    assert m["DS"] is None and m["DG_avg"] is None and m["fluency"] is None
    assert m["over_refusal"] == 100.0


def test_fluency_by_hand() -> None:
    # "a b a b": bigrams ab, ba, ab -> p = 2/3, 1/3; trigrams aba, bab -> 1/2 each (H3 = 1 bit).
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert fluency("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # Punctuation is a word of its own: "hi , you" has 2 distinct bigrams and one trigram.
    assert fluency("hi, you") == pytest.approx((2 / 3 * 1.0 + 0.0) / 2)
    assert fluency("") == 0.0 and fluency("one") == 0.0
    repetitive = fluency("go away " * 20)
    varied = fluency("the quick brown fox jumps over the lazy dog while a cat sleeps nearby")
    assert repetitive < 1.5 < varied


def test_knowledge_logprobs_and_locality() -> None:
    lm = tiny_model("gpt2")
    cases = [instance("a"), instance("b")]
    pre = knowledge_logprobs(lm, cases)
    answer_len = len("Paris is nice.")  # one token per character
    assert [t.shape for t in pre] == [(answer_len, lm.model.config.vocab_size)] * 2
    assert pre[0].dtype == torch.float32 and pre[0].device.type == "cpu"
    assert torch.allclose(pre[0].exp().sum(-1), torch.ones(answer_len))
    assert locality(pre, pre) == {"locality": 100.0, "locality_kl": 0.0}

    other = knowledge_logprobs(tiny_model("gpt2", seed=1), cases)
    changed = locality(pre, other)
    assert changed["locality"] < 100.0 and changed["locality_kl"] > 0.0


def test_locality_by_hand() -> None:
    pre = [torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))]
    post = [torch.log(torch.tensor([[0.5, 0.5], [0.1, 0.9]]))]
    result = locality(pre, post)
    assert result["locality"] == 50.0
    kl = 0.9 * math.log(0.9 / 0.1) + 0.1 * math.log(0.1 / 0.9)
    assert result["locality_kl"] == pytest.approx(kl / 2, rel=1e-5)
    with pytest.raises(InputError):
        locality(pre, [])


def test_compare_pairs_items_by_case_and_kind() -> None:
    before = Evaluation(
        metrics={"DS": 0.0},
        items=[EvalItem("a", "DS", "p", "bad", True, 1.0), EvalItem("a", "locality", "q", "ok")],
        judge="offline/2",
    )
    after = Evaluation(
        metrics={"DS": 100.0},
        items=[
            EvalItem("a", "locality", "q", "ok too"),
            EvalItem("a", "DS", "p", "no", False, 0.1),
        ],
        judge="offline/2",
    )
    report = compare(before, after)
    assert report["judge"] == "offline/2"
    assert report["metrics"] == {"before": {"DS": 0.0}, "after": {"DS": 100.0}}
    ds, loc = report["generations"]
    assert ds == {
        "case": "a",
        "kind": "DS",
        "prompt": "p",
        "before": "bad",
        "after": "no",
        "unsafe_before": True,
        "unsafe_after": False,
        "score_before": 1.0,
        "score_after": 0.1,
    }
    assert loc["kind"] == "locality" and loc["after"] == "ok too"
    with pytest.raises(InputError):
        compare(before, Evaluation(metrics={}, judge="hf:x"))
