import pytest
import torch

from app.ml.deltas import Delta, DenseUpdate, LowRankUpdate, applied, apply_deltas, fingerprint
from app.ml.errors import ChecksumMismatchError, DeltaError, FingerprintMismatchError
from tests.factories import tiny_model

NAME = "model.layers.1.mlp.down_proj.weight"


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _dense(model, name=NAME, scale=1e-3, seed=1):
    torch.manual_seed(seed)
    shape = dict(model.named_parameters())[name].shape
    return Delta({name: DenseUpdate(torch.randn(shape) * scale)}, fingerprint(model, [name]))


def _lowrank(model, name=NAME, rank=2, seed=2):
    torch.manual_seed(seed)
    out, inp = dict(model.named_parameters())[name].shape
    update = LowRankUpdate(a=torch.randn(rank, inp) * 0.1, b=torch.randn(out, rank) * 0.1)
    return Delta({name: update}, fingerprint(model, [name]))


@pytest.mark.parametrize("make", [_dense, _lowrank])
def test_revert_restores_weights_bitwise(make):
    lm = tiny_model("llama")
    before = _params(lm.model)
    delta = make(lm.model)
    handle = apply_deltas(lm.model, [delta])
    changed = dict(lm.model.named_parameters())[NAME]
    assert not torch.equal(changed, before[NAME])
    torch.testing.assert_close(changed, before[NAME] + delta.updates[NAME].dense())
    handle.revert()
    after = _params(lm.model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_chain_composes_by_addition():
    lm = tiny_model("llama")
    first, second = _dense(lm.model, seed=1), _dense(lm.model, seed=2)
    other = _dense(lm.model, name="model.layers.2.mlp.down_proj.weight", seed=3)
    base = _params(lm.model)
    with applied(lm.model, [first, second, other]):
        params = dict(lm.model.named_parameters())
        expected = base[NAME] + first.updates[NAME].value + second.updates[NAME].value
        torch.testing.assert_close(params[NAME], expected)
        torch.testing.assert_close(
            params["model.layers.2.mlp.down_proj.weight"],
            base["model.layers.2.mlp.down_proj.weight"]
            + other.updates["model.layers.2.mlp.down_proj.weight"].value,
        )
    assert torch.equal(dict(lm.model.named_parameters())[NAME], base[NAME])


def test_lowrank_sum_stays_lowrank_and_exact():
    lm = tiny_model("llama")
    x, y = _lowrank(lm.model, seed=1), _lowrank(lm.model, seed=2)
    total = (x + y).updates[NAME]
    assert isinstance(total, LowRankUpdate) and total.a.shape[0] == 4
    torch.testing.assert_close(total.dense(), x.updates[NAME].dense() + y.updates[NAME].dense())


@pytest.mark.parametrize("make", [_dense, _lowrank])
def test_bytes_round_trip_keeps_values_and_metadata(make):
    lm = tiny_model("llama")
    delta = make(lm.model)
    delta = Delta(delta.updates, delta.base_fingerprint, {"model": "tiny"})
    back = Delta.from_bytes(delta.to_bytes())
    assert back.base_fingerprint == delta.base_fingerprint
    assert back.meta == {"model": "tiny"}
    assert back.encoding == delta.encoding
    torch.testing.assert_close(back.updates[NAME].dense(), delta.updates[NAME].dense())


def test_checksum_mismatch_is_refused():
    lm = tiny_model("llama")
    data = bytearray(_dense(lm.model).to_bytes())
    from app.ml.deltas import checksum

    expected = checksum(bytes(data))
    data[-1] ^= 0xFF  # flip bits inside the tensor data
    with pytest.raises(ChecksumMismatchError, match="checksum"):
        Delta.from_bytes(bytes(data), sha256=expected)


def test_garbage_bytes_are_not_a_delta():
    with pytest.raises(DeltaError, match="not a detox delta"):
        Delta.from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")


def test_delta_for_another_base_is_refused():
    made_on = tiny_model("llama", seed=0)
    other = tiny_model("llama", seed=1)  # same config, different weights
    delta = _dense(made_on.model)
    with pytest.raises(FingerprintMismatchError, match="different base"):
        apply_deltas(other.model, [delta])
    before = _params(other.model)
    assert all(torch.equal(before[n], p) for n, p in other.model.named_parameters())


def test_delta_for_another_architecture_is_refused():
    delta = _dense(tiny_model("llama").model)
    with pytest.raises(DeltaError, match="does not have"):
        apply_deltas(tiny_model("gpt2").model, [delta])


def test_fingerprint_depends_on_config_and_values_not_dtype():
    lm = tiny_model("llama")
    fp = fingerprint(lm.model, [NAME])
    assert fp == fingerprint(lm.model.to(torch.bfloat16), [NAME])
    lm.model.to(torch.float32)
    with torch.no_grad():
        dict(lm.model.named_parameters())[NAME][0, 0] += 1.0
    assert fingerprint(lm.model, [NAME]) != fp
    lm2 = tiny_model("llama")
    lm2.model.config.rms_norm_eps = 1e-3
    assert fingerprint(lm2.model, [NAME]) != fp


def test_non_finite_result_is_refused_and_nothing_changes():
    lm = tiny_model("llama")
    before = _params(lm.model)
    shape = before[NAME].shape
    bad = Delta({NAME: DenseUpdate(torch.full(shape, float("inf")))})
    with pytest.raises(DeltaError, match="non-finite"):
        apply_deltas(lm.model, [bad])
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())


def test_gpt2_conv1d_delta_in_parameter_layout():
    lm = tiny_model("gpt2")
    name = lm.adapter.mlp_out_param_name(1)
    delta = _dense(lm.model, name=name)
    x = torch.randn(1, 3, 128)
    module = lm.adapter.mlp_out(1)
    expected = x @ (module.weight + delta.updates[name].value) + module.bias
    with applied(lm.model, [delta]):
        torch.testing.assert_close(module(x), expected)


def test_adapter_rank_stacks_low_rank_updates_and_is_full_once_one_is_dense():
    from app.ml.deltas import adapter_rank

    def low(rank: int) -> Delta:
        return Delta({"w": LowRankUpdate(a=torch.ones(rank, 20), b=torch.ones(12, rank))})

    assert adapter_rank([]) == 0
    assert adapter_rank([low(2)]) == 2
    assert adapter_rank([low(2), low(3)]) == 5  # a chain's sum: the factors stacked
    dense = Delta({"w": DenseUpdate(torch.ones(12, 20))})
    assert adapter_rank([low(2), dense]) == 12
    assert (
        adapter_rank([low(2), Delta({"v": LowRankUpdate(torch.ones(7, 9), torch.ones(9, 7))})]) == 7
    )
