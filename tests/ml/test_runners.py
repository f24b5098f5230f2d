import pytest
import torch
import transformers as tf

from app.ml import runners
from app.ml.models import LoadedModel
from app.ml.runners import FastRunner, PlainRunner
from app.ml.weights_cache import weights_key
from tests.factories import _DECODER, tiny_model, tiny_tokenizer

LOWEST = 1  # the lowest replayed layer of the tiny models' four


def _sliding(window: int) -> LoadedModel:
    """Gemma 2 alternates sliding-window and full layers: their masks differ past the window."""
    torch.manual_seed(0)
    config = tf.Gemma2Config(**_DECODER, sliding_window=window)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), name="tiny-gemma2-window")


def _sequences(lengths: list[int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(4, 90, (2, n), generator=generator) for n in lengths]


def _top_layer_calls(lm: LoadedModel, sequences: list[torch.Tensor]) -> tuple[FastRunner, int]:
    calls = []
    hook = lm.adapter.layers[-1].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        runner = FastRunner(lm, LOWEST, sequences)
    finally:
        hook.remove()
    return runner, len(calls)


def _same_logits(runner: FastRunner, lm: LoadedModel, sequences: list[torch.Tensor]) -> None:
    plain = PlainRunner(lm, 0, sequences)
    for index, ids in enumerate(sequences):
        with torch.no_grad():
            torch.testing.assert_close(
                runner.rows_logits(index, ids.shape[1]), plain.rows_logits(index, ids.shape[1])
            )


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2", "gpt-neox", "opt", "phi3"])
def test_recording_stops_at_the_lowest_replayed_layer(family):
    lm = tiny_model(family)
    sequences = _sequences([7, 12, 5])
    runner, top_calls = _top_layer_calls(lm, sequences)
    assert top_calls == 1  # the two-token probe only, no recording pass reached the top
    _same_logits(runner, lm, sequences)


def test_layers_of_different_attention_types_are_each_recorded():
    lm = _sliding(window=3)
    sequences = _sequences([9, 14])
    runner, top_calls = _top_layer_calls(lm, sequences)
    _same_logits(runner, lm, sequences)
    assert top_calls == len(sequences)  # no probe: the config tells


def _shared_runner(lm: LoadedModel, sequences: list[torch.Tensor]) -> tuple[FastRunner, int]:
    """A runner whose sequences are all shared, as a new process builds it (nothing kept in
    memory), and how many times the layer below the replayed ones ran to its end."""
    runners._RECORDINGS.values.clear()
    calls = []
    hook = lm.adapter.layers[LOWEST - 1].register_forward_hook(lambda *_: calls.append(1))
    try:
        runner = FastRunner(lm, LOWEST, sequences, shared=(weights_key(lm.model), 0))
    finally:
        hook.remove()
    return runner, len(calls)


def test_shared_inputs_are_kept_on_disk_and_read_back_by_a_new_process(tmp_path):
    lm = tiny_model("llama")
    lm.cache_dir = tmp_path
    sequences = _sequences([7, 12])
    _, below_calls = _shared_runner(lm, sequences)
    assert below_calls == 1 + len(sequences)  # the probe, and a recording pass each
    assert len(list(tmp_path.glob("*.safetensors"))) == len(sequences)
    runner, below_calls = _shared_runner(lm, sequences)
    assert below_calls == 1  # the probe only: the inputs came from disk
    _same_logits(runner, lm, sequences)

    for kept in tmp_path.glob("*.safetensors"):
        kept.write_bytes(b"not safetensors")
    runner, below_calls = _shared_runner(lm, sequences)
    assert below_calls == 1 + len(sequences)  # rebuilt, not trusted
    _same_logits(runner, lm, sequences)

    with torch.no_grad():
        lm.adapter.layers[0].mlp.down_proj.weight.mul_(1.5)  # weights below the replayed layer
    runner, below_calls = _shared_runner(lm, sequences)
    assert below_calls == 1 + len(sequences)
    _same_logits(runner, lm, sequences)


def test_no_disk_inputs_where_layers_take_different_arguments(tmp_path):
    lm = _sliding(window=3)
    lm.cache_dir = tmp_path
    _shared_runner(lm, _sequences([9]))
    assert not list(tmp_path.glob("*.safetensors"))
