"""Tiny random-weight models of each supported family, built from a config (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from app.ml.models import LoadedModel

VOCAB = 96
_COMMON = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_DECODER = {
    **_COMMON,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "head_dim": 8,
}

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_DECODER),
    "mistral": lambda: tf.MistralConfig(**_DECODER),
    "qwen2": lambda: tf.Qwen2Config(**_DECODER),
    "gemma": lambda: tf.GemmaConfig(**_DECODER),
    "gemma2": lambda: tf.Gemma2Config(**_DECODER),
    "phi3": lambda: tf.Phi3Config(**{k: v for k, v in _DECODER.items() if k != "head_dim"}),
    "gpt2": lambda: tf.GPT2Config(**_COMMON, n_embd=32, n_layer=4, n_head=4, n_positions=256),
    "gpt-neox": lambda: tf.GPTNeoXConfig(
        **_COMMON,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=256,
    ),
    "opt": lambda: tf.OPTConfig(
        **_COMMON,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=32,
    ),
}

# The adapter family each config must resolve to.
EXPECTED_FAMILY = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "phi3": "llama",
    "gpt2": "gpt2",
    "gpt-neox": "gpt-neox",
    "opt": "opt",
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, with a ChatML-like template."""
    chars = [chr(c) for c in range(32, 127)][: VOCAB - 4]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>a:{% endif %}"
    )
    return tokenizer


def tiny_model(family: str = "llama", *, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), name=f"tiny-{family}")
