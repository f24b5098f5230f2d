"""ModelAdapter on tiny random models of every supported family."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from torch import nn

from app.ml.arch import ModelAdapter
from app.ml.errors import InputError, UnknownArchitectureError
from tests.factories import CONFIGS, EXPECTED_FAMILY, tiny_model

FAMILIES = sorted(CONFIGS)


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    return tiny_model(request.param)


def test_every_config_has_an_expected_family():
    assert set(CONFIGS) == set(EXPECTED_FAMILY)


def test_resolves_family_and_layer_count(loaded):
    family = loaded.name.removeprefix("tiny-")
    adapter = ModelAdapter(loaded.model)
    assert adapter.family == EXPECTED_FAMILY[family]
    assert adapter.num_layers == loaded.model.config.num_hidden_layers == 4


def test_mlp_out_is_the_module_named_by_its_parameter_name(loaded):
    adapter = loaded.adapter
    params = dict(loaded.model.named_parameters())
    for layer in range(adapter.num_layers):
        name = adapter.mlp_out_param_name(layer)
        assert name in params, name
        assert params[name] is adapter.mlp_out(layer).weight
    # Each layer has its own projection.
    assert adapter.mlp_out(0) is not adapter.mlp_out(adapter.num_layers - 1)


def test_weight_layout(loaded):
    adapter = loaded.adapter
    config = loaded.model.config
    weight = adapter.mlp_out(0).weight
    hidden = config.hidden_size
    if adapter.family == "gpt2":
        assert adapter.spec.transposed
        assert tuple(weight.shape) == (4 * hidden, hidden)  # Conv1D: [in, out]
    else:
        assert not adapter.spec.transposed
        inner = getattr(config, "intermediate_size", None) or config.ffn_dim
        assert tuple(weight.shape) == (hidden, inner)  # nn.Linear: [out, in]


def test_logits_from_hidden_reproduces_the_model(loaded):
    adapter = loaded.adapter
    captured = {}

    def keep(_module, _inputs, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    handle = adapter.layers[-1].register_forward_hook(keep)
    try:
        ids = torch.randint(4, 96, (2, 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = loaded.model(input_ids=ids, use_cache=False).logits
            got = adapter.logits_from_hidden(captured["hidden"])
    finally:
        handle.remove()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_gemma2_softcapping_is_applied():
    loaded = tiny_model("gemma2")
    cap = loaded.model.config.final_logit_softcapping
    assert cap
    hidden = torch.randn(1, 3, loaded.model.config.hidden_size) * 100
    with torch.no_grad():
        logits = loaded.adapter.logits_from_hidden(hidden)
    assert logits.abs().max() <= cap


@pytest.mark.parametrize("layer", [-1, 4, 100])
def test_out_of_range_layer_is_an_input_error(layer):
    adapter = tiny_model("llama").adapter
    with pytest.raises(InputError, match=rf"layer {layer} is out of range.*0\.\.3"):
        adapter.mlp_out(layer)
    with pytest.raises(InputError, match="out of range"):
        adapter.mlp_out_param_name(layer)
    with pytest.raises(InputError, match="out of range"):
        adapter.check_layer(layer)


def _tiny_bert() -> nn.Module:
    config = tf.BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return tf.BertForMaskedLM(config)


def _tiny_t5() -> nn.Module:
    config = tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return tf.T5ForConditionalGeneration(config)


class _Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="mystery", architectures=["MysteryForCausalLM"])
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])


@pytest.mark.parametrize(
    ("build", "names"),
    [
        (_tiny_bert, ("bert", "BertForMaskedLM")),
        (_tiny_t5, ("t5", "T5ForConditionalGeneration")),
        (_Mystery, ("mystery", "MysteryForCausalLM")),
    ],
)
def test_unknown_architecture_names_it_and_lists_supported(build, names):
    with pytest.raises(UnknownArchitectureError) as info:
        ModelAdapter(build())
    message = str(info.value)
    for name in names:
        assert name in message
    for supported in ("Llama", "GPT-2", "mlp.down_proj", "mlp.c_proj", "GPT-NeoX", "OPT"):
        assert supported in message
    assert isinstance(info.value, InputError)


def test_module_without_config_is_named_by_its_class():
    class Bare(nn.Module):
        pass

    with pytest.raises(UnknownArchitectureError, match="Bare"):
        ModelAdapter(Bare())


def test_layers_without_mlp_are_not_matched():
    """A module list at a known path is not enough: the MLP projection must exist too."""
    model = tiny_model("llama").model
    for layer in model.model.layers:
        del layer.mlp.down_proj
    with pytest.raises(UnknownArchitectureError):
        ModelAdapter(model)


def test_layer_without_the_projection_is_an_input_error():
    """Matching checks layer 0 only; a later layer (e.g. mixture of experts) may lack it."""
    adapter = tiny_model("llama").adapter
    del adapter.layers[2].mlp.down_proj
    assert adapter.mlp_out(1) is adapter.layers[1].mlp.down_proj
    with pytest.raises(InputError, match=r"layer 2 has no mlp\.down_proj"):
        adapter.mlp_out(2)
    with pytest.raises(InputError, match=r"layer 2 has no mlp\.down_proj"):
        adapter.mlp_out_param_name(2)
