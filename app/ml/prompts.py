"""Turning text into model inputs: chat templates, prompt+answer pairs, left truncation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def chat_text(tokenizer: PreTrainedTokenizerBase, user: str, *, suffix: str | None = None) -> str:
    """The prompt string the model expects before its answer to `user`."""
    if suffix:
        user = f"{user} {suffix}"
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{user}\n"  # base models without a template: the plain text, then the answer


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt; a chat template already carries its special tokens."""
    return tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]


@dataclass
class PromptAnswer:
    """One sequence = prompt tokens then answer tokens; the loss covers the answer only."""

    input_ids: torch.Tensor  # [1, T]
    answer_start: int  # index of the first answer token
    truncated: int = 0  # prompt tokens dropped on the left to fit the context

    @property
    def answer_len(self) -> int:
        return self.input_ids.shape[1] - self.answer_start


def encode_prompt_answer(
    tokenizer: PreTrainedTokenizerBase,
    prompt_text: str,
    answer: str,
    *,
    max_length: int,
    add_eos: bool = False,
) -> PromptAnswer:
    """Encode prompt + answer; drop prompt tokens on the left when the pair exceeds `max_length`."""
    prompt = encode_prompt(tokenizer, prompt_text)
    target = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        target = [*target, tokenizer.eos_token_id]
    # A long answer may take the room the prompt does not need, but never more than half of the
    # context from a prompt that needs it: the edit must still see what it answers.
    target = target[: max(1, max_length - min(len(prompt), max_length // 2))]
    overflow = max(0, len(prompt) + len(target) - max_length)
    prompt = prompt[overflow:]
    ids = torch.tensor([prompt + target], dtype=torch.long)
    return PromptAnswer(input_ids=ids, answer_start=len(prompt), truncated=overflow)


def right_padded(rows: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """[len(rows), longest] token ids, each row from the left and `pad_id` after it. With causal
    attention no real token sees the padding after it, so no mask is needed: every real
    position's outputs are those of its row alone."""
    ids = torch.full((len(rows), max(row.shape[0] for row in rows)), pad_id, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : row.shape[0]] = row
    return ids
