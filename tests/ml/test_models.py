"""Device/dtype choice and model loading from a folder and from a GGUF file."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
import transformers as tf
from transformers.convert_slow_tokenizer import bytes_to_unicode

from app.ml.errors import InputError, UnknownArchitectureError
from app.ml.gguf import read_gguf
from app.ml.models import LoadedModel, load_model, pick_device, pick_dtype
from tests.factories import tiny_model, tiny_tokenizer


def _logits(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=ids, use_cache=False).logits


IDS = torch.tensor([[5, 17, 42, 8, 77, 31, 60]])


# -- device and dtype -------------------------------------------------------------------------


def test_auto_device_and_dtype_follow_the_hardware():
    device = pick_device("auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device.type == expected
    assert pick_dtype(device, "auto") == (torch.bfloat16 if expected == "cuda" else torch.float32)


def test_auto_dtype_per_device():
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cuda")) == torch.bfloat16


def test_explicit_device_and_dtype():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    cpu = torch.device("cpu")
    assert pick_dtype(cpu, "float32") == torch.float32
    assert pick_dtype(cpu, "bfloat16") == torch.bfloat16
    assert pick_dtype(cpu, "float16") == torch.float16


@pytest.mark.parametrize("dtype", ["float64", "fp16", "int8", ""])
def test_bad_dtype_is_an_input_error(dtype):
    with pytest.raises(InputError, match=rf"unknown dtype '{dtype}'.*float32"):
        pick_dtype(torch.device("cpu"), dtype)


@pytest.mark.parametrize("device", ["gpu0", "cuda:x", ""])
def test_bad_device_is_an_input_error(device):
    with pytest.raises(InputError, match="unknown device"):
        pick_device(device)


# -- folders ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory) -> tuple[Path, LoadedModel]:
    """A tiny GPT-2 and a tokenizer *without* a pad token, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    original = tiny_model("gpt2")
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    original.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, original


def test_load_folder(saved_folder):
    folder, original = saved_folder
    loaded = load_model(str(folder), device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == str(folder)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32
    assert loaded.adapter.family == "gpt2"
    assert loaded.context_length == 256  # n_positions in the config
    # The saved tokenizer has none; loading falls back to eos.
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"
    assert loaded.tokenizer.chat_template
    torch.testing.assert_close(_logits(loaded, IDS), _logits(original, IDS))


def test_load_folder_in_another_dtype(saved_folder):
    folder, _ = saved_folder
    loaded = load_model(str(folder), device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16


def test_context_length_from_max_position_embeddings():
    loaded = tiny_model("llama")
    assert loaded.context_length == 256
    loaded.model.config.max_position_embeddings = 1234
    assert loaded.context_length == 1234


def test_folder_without_config_is_an_input_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"no config\.json"):
        load_model(str(tmp_path), device="cpu")


def test_missing_gguf_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="GGUF file not found"):
        load_model(str(tmp_path / "absent.gguf"), device="cpu")


@pytest.mark.parametrize("source", ["/no/such/model-folder", "./no-such-model", "~/no-such-model"])
def test_missing_local_path_is_an_input_error_not_a_hub_lookup(source):
    with pytest.raises(InputError, match="no such file or folder"):
        load_model(source, device="cpu")


def test_broken_config_is_an_input_error(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot load model"):
        load_model(str(tmp_path), device="cpu")


def test_folder_without_tokenizer_is_an_input_error(tmp_path):
    tiny_model("llama").model.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="cannot load model"):
        load_model(str(tmp_path), device="cpu")


def test_not_a_causal_lm_is_an_input_error(tmp_path):
    config = tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    tf.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(InputError, match="Unrecognized configuration class"):
        load_model(str(tmp_path), device="cpu")


def test_causal_lm_of_unknown_architecture_is_refused(tmp_path):
    config = tf.BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        is_decoder=True,
    )
    tf.BertLMHeadModel(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnknownArchitectureError, match="bert"):
        load_model(str(tmp_path), device="cpu")


def test_bad_dtype_fails_before_loading(tmp_path):
    with pytest.raises(InputError, match="unknown dtype"):
        load_model(str(tmp_path), device="cpu", dtype="float64")


# -- GGUF -------------------------------------------------------------------------------------


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (rotary halves interleaved), which transformers undoes."""
    shape = weight.shape
    return (
        weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def _write_llama_gguf(loaded: LoadedModel, path: Path) -> None:
    """An unquantised GGUF of a tiny llama, with a byte-level BPE vocabulary of the same size."""
    config = loaded.model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    spelling = bytes_to_unicode()
    chars = [spelling[b] for b in range(32, 32 + config.vocab_size - 5)]
    tokens = ["<pad>", "<s>", "</s>", "<unk>", *chars, "ab"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * 4 + [1] * (len(tokens) - 4))  # 3 = control
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)  # and no pad token
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in loaded.model.state_dict().items():
        for key, count in heads.items():
            if key in name:
                tensor = _permute(tensor, count)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> tuple[Path, LoadedModel]:
    original = tiny_model("llama", seed=3)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write_llama_gguf(original, path)
    return path, original


def test_file_that_is_not_gguf_is_an_input_error(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(InputError, match=r"cannot read GGUF file .*fake\.gguf"):
        load_model(str(path), device="cpu")


def test_gguf_round_trip(gguf_file):
    path, original = gguf_file
    loaded = load_model(str(path), device="cpu")
    assert loaded.adapter.family == "llama"
    assert loaded.adapter.num_layers == 4
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.eos_token == "</s>"
    assert loaded.tokenizer.pad_token == "</s>"
    assert loaded.tokenizer.chat_template
    assert loaded.tokenizer("hi", add_special_tokens=False)["input_ids"] == [
        ord("h") - 28,
        ord("i") - 28,
    ]
    torch.testing.assert_close(_logits(loaded, IDS), _logits(original, IDS))


def test_gguf_model_can_be_saved_and_reloaded(gguf_file, tmp_path):
    """The demo conversion depends on this: the GGUF quantiser must not block save_pretrained."""
    path, original = gguf_file
    model, tokenizer = read_gguf(path)
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path), device="cpu")
    torch.testing.assert_close(_logits(reloaded, IDS), _logits(original, IDS))
