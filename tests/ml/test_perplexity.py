"""Perplexity: agreement with transformers' own loss, token accounting, batching, the packaged
reference text, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from app.ml.errors import InputError
from app.ml.perplexity import encode_text, perplexity, reference_texts, token_logprobs
from tests.factories import tiny_model

TEXTS = ["The river runs to the sea.", "Bread needs flour, water, salt and yeast.", "Hi."]


def hf_nll(lm, text: str) -> tuple[float, int]:
    """(summed NLL, predicted tokens) of BOS + text from the model's own `labels=` loss."""
    ids = torch.tensor(
        [[lm.tokenizer.bos_token_id, *lm.tokenizer(text, add_special_tokens=False)["input_ids"]]]
    )
    with torch.no_grad():
        loss = lm.model(input_ids=ids, labels=ids).loss.item()  # mean over the n − 1 predictions
    return loss * (ids.shape[1] - 1), ids.shape[1] - 1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_single_text_matches_the_models_own_loss(family):
    lm = tiny_model(family)
    nll, tokens = hf_nll(lm, TEXTS[0])
    result = perplexity(lm, TEXTS[:1])
    assert result["tokens"] == tokens == len(TEXTS[0])  # character tokens, BOS predicts the first
    assert result["texts"] == 1
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_several_texts_pool_tokens_and_batching_changes_nothing():
    lm = tiny_model("llama")
    parts = [hf_nll(lm, text) for text in TEXTS]
    expected = math.exp(sum(n for n, _ in parts) / sum(t for _, t in parts))
    one = perplexity(lm, TEXTS, batch_size=1)
    padded = perplexity(lm, TEXTS, batch_size=3)
    assert one["tokens"] == padded["tokens"] == sum(t for _, t in parts)
    assert one["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert padded["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_reference_text_and_a_finite_perplexity():
    texts = reference_texts()
    assert len(texts) == 40 and len(set(texts)) == 40
    assert all(isinstance(t, str) and 1 <= t.count(". ") + 1 <= 3 for t in texts)
    result = perplexity(tiny_model("gpt2"))  # None: the reference text
    assert result["texts"] == 40 and result["tokens"] == sum(len(t) for t in texts)
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1


def test_truncation_and_bfloat16():
    lm = tiny_model("llama")
    assert perplexity(lm, ["x" * 500])["tokens"] == 255  # context 256, BOS included
    assert perplexity(lm, ["x" * 500], max_length=10)["tokens"] == 9
    lm.model.to(torch.bfloat16)
    assert math.isfinite(perplexity(lm, TEXTS)["perplexity"])


def test_without_a_bos_the_first_token_is_not_scored():
    lm = tiny_model("llama")
    lm.tokenizer.bos_token = None
    assert encode_text(lm.tokenizer, "abc", max_length=2) == lm.tokenizer("ab")["input_ids"]
    assert perplexity(lm, ["abc"])["tokens"] == 2
    assert [len(r) for r in token_logprobs(lm, [[5], [], [5, 6, 7]])] == [0, 0, 2]


@pytest.mark.parametrize(
    ("texts", "kwargs", "message"),
    [
        ([], {}, "no texts"),
        ([""], {"max_length": 1}, "at least 2"),
        (["ok", 3], {}, "text 1 is a int"),
        (["ok"], {"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_input(texts, kwargs, message):
    with pytest.raises(InputError, match=message):
        perplexity(tiny_model("llama"), texts, **kwargs)


def test_texts_with_nothing_to_predict():
    lm = tiny_model("llama")
    lm.tokenizer.bos_token = None
    with pytest.raises(InputError, match="no token to predict"):
        perplexity(lm, ["a", ""])
