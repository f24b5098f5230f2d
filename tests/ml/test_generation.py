"""Batched generation on tiny random models: padding, truncation, sampling, stopping."""

from __future__ import annotations

import pytest
import torch

from app.ml.errors import InputError
from app.ml.generation import generate
from app.ml.prompts import chat_text, encode_prompt
from tests.factories import tiny_model

PROMPTS = ["hi", "a somewhat longer user prompt", "mid-size one"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_left_padded_batch_matches_one_at_a_time(family: str) -> None:
    lm = tiny_model(family)
    batched = generate(lm, PROMPTS, max_new_tokens=6, batch_size=3)
    alone = [generate(lm, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in alone]
    # The prompts really differ in length, so the batch really was padded.
    assert len({g.prompt_tokens for g in batched}) == len(PROMPTS)
    assert lm.tokenizer.padding_side == "right"  # restored after the call


def test_results_keep_the_callers_order() -> None:
    lm = tiny_model("llama")
    forward = generate(lm, PROMPTS, max_new_tokens=4, batch_size=2)
    backward = generate(lm, PROMPTS[::-1], max_new_tokens=4, batch_size=2)
    assert [g.text for g in forward] == [g.text for g in backward][::-1]


def test_long_prompt_is_left_truncated_and_recorded() -> None:
    lm = tiny_model("llama")  # context 256
    prompt = "x" * 300
    (result,) = generate(lm, [prompt], max_new_tokens=16)
    full = len(encode_prompt(lm.tokenizer, chat_text(lm.tokenizer, prompt)))
    assert full > 256
    assert result.prompt_tokens == 256 - 16
    assert result.truncated == full - (256 - 16)
    (short,) = generate(lm, ["short"], max_new_tokens=16)
    assert short.truncated == 0


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone() -> None:
    lm = tiny_model("llama")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate(lm, PROMPTS, max_new_tokens=8, temperature=1.5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    again = generate(lm, PROMPTS, max_new_tokens=8, temperature=1.5, seed=7)
    other = generate(lm, PROMPTS, max_new_tokens=8, temperature=1.5, seed=8)
    greedy = generate(lm, PROMPTS, max_new_tokens=8)
    assert [g.text for g in first] == [g.text for g in again]
    assert [g.text for g in first] != [g.text for g in other]
    assert [g.text for g in first] != [g.text for g in greedy]


def test_stops_at_eos() -> None:
    lm = tiny_model("gpt2")
    bonus = torch.zeros(lm.model.config.vocab_size)
    bonus[lm.tokenizer.eos_token_id] = 1e4  # make the end token every step's greedy choice
    lm.model.lm_head.register_forward_hook(lambda _module, _args, logits: logits + bonus)
    (result,) = generate(lm, ["hello"], max_new_tokens=10)
    assert result.text == ""
    assert result.completion_tokens == 1


def test_chat_false_feeds_the_text_unchanged() -> None:
    lm = tiny_model("llama")
    (chat,) = generate(lm, ["abc"], max_new_tokens=2)
    (plain,) = generate(lm, ["abc"], max_new_tokens=2, chat=False)
    assert plain.prompt_tokens == len("abc")
    assert chat.prompt_tokens > plain.prompt_tokens


def test_empty_and_bad_parameters() -> None:
    lm = tiny_model("llama")
    assert generate(lm, []) == []
    with pytest.raises(InputError, match="max_new_tokens"):
        generate(lm, ["x"], max_new_tokens=256)
    with pytest.raises(InputError, match="top_p"):
        generate(lm, ["x"], top_p=0.0)


def test_progress_moves_with_every_token_not_only_after_a_batch() -> None:
    lm = tiny_model("llama")
    seen: list[float] = []
    plain = generate(lm, ["Hi", "Tell me a story"], max_new_tokens=6, batch_size=8)
    watched = generate(lm, ["Hi", "Tell me a story"], max_new_tokens=6, batch_size=8,
                       progress=seen.append)  # fmt: skip
    assert [g.text for g in watched] == [g.text for g in plain]  # watching changes nothing
    inside = [f for f in seen if 0 < f < 1]
    assert len(set(inside)) >= 3, seen  # one batch, yet it moves while it generates
    assert seen == sorted(seen) and seen[-1] == 1.0
