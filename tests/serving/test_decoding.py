"""What a request's text is made of, token by token, where a character spans several tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

from app.serving.decoding import GenRequest, _advance, _Row
from app.serving.sampling import Finished, SamplingParams, TextDelta, TokenLogprob


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte, as byte-level BPE without merges: "😀" is 4 tokens."""
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core)


def decode_into_events(tokens: list[int], params: SamplingParams) -> list:
    """The events of a row that is given `tokens` one at a time until it is done."""
    lm = SimpleNamespace(tokenizer=byte_tokenizer())
    events: list = []
    row = _Row(GenRequest([0], None, params, events.append), torch.Generator())
    for token in tokens:
        if params.logprobs is not None:  # as the cohort's `take` scores each token first
            row.logprobs.append(TokenLogprob(token, -float(token)))
        if not _advance(lm, row, token, stop_ids={999}):
            break
    return events


@pytest.mark.parametrize("cut", [2, 3, 4])
def test_a_character_cut_off_by_max_tokens_is_left_out_of_the_answer(cut):
    tokens = byte_tokenizer()("a😀")["input_ids"]  # "a", then the emoji's 4 bytes
    events = decode_into_events(tokens, SamplingParams(max_tokens=cut))
    *deltas, final = events
    assert isinstance(final, Finished) and final.finish_reason == "length"
    assert final.text == "a" and "".join(d.text for d in deltas) == "a"
    assert final.completion_tokens == cut and list(final.token_ids) == tokens[:cut]


def test_a_whole_character_is_the_answer_and_streams_once_complete():
    tokens = byte_tokenizer()("a😀b")["input_ids"]
    events = decode_into_events(tokens, SamplingParams(max_tokens=len(tokens)))
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert deltas == ["a", "😀", "b"]  # the emoji as one piece, never a U+FFFD first
    assert events[-1].text == "a😀b"


def test_an_end_token_in_the_middle_of_a_character_leaves_it_out():
    tokens = [*byte_tokenizer()("a😀")["input_ids"][:3], 999]
    final = decode_into_events(tokens, SamplingParams(max_tokens=10))[-1]
    assert final.finish_reason == "stop" and final.text == "a"


def test_each_streamed_piece_carries_the_logprobs_of_the_tokens_it_came_from():
    tokens = byte_tokenizer()("a😀b")["input_ids"]
    events = decode_into_events([*tokens, 999], SamplingParams(max_tokens=10, logprobs=0))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert [(d.text, [e.token for e in d.logprobs]) for d in deltas] == [
        ("a", tokens[:1]),
        ("😀", tokens[1:5]),
        ("b", tokens[5:]),  # the end token's left out
    ]
    assert [e.token for e in events[-1].logprobs] == tokens
    cut = decode_into_events(tokens[:3], SamplingParams(max_tokens=3, logprobs=0))
    assert [(d.text, len(d.logprobs)) for d in cut if isinstance(d, TextDelta)] == [
        ("a", 1),
        ("", 2),  # the cut character brings no text, its tokens' logprobs still go out
    ]
