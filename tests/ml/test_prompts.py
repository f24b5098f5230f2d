"""Chat text and prompt+answer encoding, on the character-level tiny tokenizer (a token a char)."""

from __future__ import annotations

import pytest
from tokenizers import processors

from app.ml.dinm_params import PAPER_SUFFIX
from app.ml.prompts import chat_text, encode_prompt, encode_prompt_answer
from tests.factories import tiny_tokenizer


@pytest.fixture
def chat():
    return tiny_tokenizer()


@pytest.fixture
def plain():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- chat_text --------------------------------------------------------------------------------


def test_chat_text_uses_the_template(chat):
    assert chat_text(chat, "Hi there") == "<s>u:Hi there</s><s>a:"


def test_chat_text_appends_the_suffix_to_the_user_turn(chat):
    assert chat_text(chat, "Hi", suffix="Be nice:") == "<s>u:Hi Be nice:</s><s>a:"
    text = chat_text(chat, "Hi", suffix=PAPER_SUFFIX)
    assert text.startswith("<s>u:Hi If the user's request is reasonable")
    assert text.endswith("</s><s>a:")


def test_empty_suffix_changes_nothing(chat, plain):
    assert chat_text(chat, "Hi", suffix="") == chat_text(chat, "Hi")
    assert chat_text(plain, "Hi", suffix=None) == chat_text(plain, "Hi")


def test_chat_text_without_template_is_the_plain_text(plain):
    assert chat_text(plain, "Hi there") == "Hi there\n"
    assert chat_text(plain, "Hi", suffix="Be nice:") == "Hi Be nice:\n"


def test_encode_prompt_adds_bos_only_without_a_template(chat, plain):
    for tokenizer in (chat, plain):  # a tokenizer whose special tokens add a BOS
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
        )
    bos = chat.bos_token_id
    templated = encode_prompt(chat, chat_text(chat, "hi"))
    assert templated == ids(chat, "<s>u:hi</s><s>a:")  # the template's own BOS, not doubled
    assert templated[:2] == [bos, ids(chat, "u")[0]]
    assert encode_prompt(plain, "hi") == [bos, *ids(plain, "hi")]


# -- encode_prompt_answer ---------------------------------------------------------------------


def test_prompt_then_answer(chat):
    pair = encode_prompt_answer(chat, "question?", "answer", max_length=64)
    row = pair.input_ids[0].tolist()
    assert pair.input_ids.shape == (1, len("question?") + len("answer"))
    assert pair.answer_start == len("question?")
    assert row[pair.answer_start :] == ids(chat, "answer")
    assert row[pair.answer_start] == ids(chat, "a")[0]  # the first answer token
    assert pair.answer_len == len("answer")
    assert pair.truncated == 0


def test_prompt_uses_the_template_special_tokens(chat):
    prompt = chat_text(chat, "q")
    pair = encode_prompt_answer(chat, prompt, "ok", max_length=64)
    row = pair.input_ids[0].tolist()
    assert row[: pair.answer_start] == encode_prompt(chat, prompt)
    assert chat.convert_ids_to_tokens(row[pair.answer_start :]) == ["o", "k"]


def test_add_eos_appends_eos(chat):
    pair = encode_prompt_answer(chat, "q?", "ok", max_length=64, add_eos=True)
    row = pair.input_ids[0].tolist()
    assert row[-1] == chat.eos_token_id
    assert row[pair.answer_start :] == [*ids(chat, "ok"), chat.eos_token_id]
    assert pair.answer_len == 3
    without = encode_prompt_answer(chat, "q?", "ok", max_length=64)
    assert without.input_ids[0].tolist()[-1] != chat.eos_token_id


def test_long_prompt_is_cut_on_the_left(chat):
    prompt = "0123456789abcdefghij"  # 20 tokens
    pair = encode_prompt_answer(chat, prompt, "yes", max_length=12)
    row = pair.input_ids[0].tolist()
    assert len(row) == 12
    assert pair.truncated == 20 + 3 - 12
    assert pair.answer_start == 12 - 3
    assert row[: pair.answer_start] == ids(chat, prompt[pair.truncated :])  # the end is kept
    assert row[pair.answer_start :] == ids(chat, "yes")


def test_exactly_max_length_is_not_truncated(chat):
    pair = encode_prompt_answer(chat, "abcdefg", "xyz", max_length=10)
    assert pair.truncated == 0
    assert pair.input_ids.shape[1] == 10


def test_long_answer_leaves_the_prompt_half_the_context(chat):
    prompt = "p" * 40
    for answer_len in (15, 19, 20, 60):
        pair = encode_prompt_answer(chat, prompt, "a" * answer_len, max_length=20)
        assert pair.input_ids.shape[1] == 20
        assert pair.answer_start == 10, answer_len  # the prompt keeps half, whatever the answer
        assert pair.truncated == 30


def test_long_answer_takes_the_room_a_short_prompt_leaves(chat):
    pair = encode_prompt_answer(chat, "pp", "a" * 60, max_length=20)
    assert pair.truncated == 0
    assert pair.answer_start == 2
    assert pair.answer_len == 18
    assert pair.input_ids.shape[1] == 20


def test_empty_prompt(chat):
    pair = encode_prompt_answer(chat, "", "abc", max_length=8)
    assert pair.answer_start == 0
    assert pair.input_ids[0].tolist() == ids(chat, "abc")
