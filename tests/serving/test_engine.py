"""The engine: versions batched together give exactly the tokens of their merged weights."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from app.ml.deltas import Delta, DenseUpdate, LowRankUpdate, applied
from app.serving.engine import Engine
from app.serving.errors import ModelLoadError, PromptTooLongError, UnknownModelError
from app.serving.factory import StoreVersionSource
from app.serving.sampling import SamplingParams, TextDelta
from app.serving.weights import BatchDeltaHooks, version_weights
from app.store import crud
from tests.factories import tiny_model
from tests.serving.conftest import merged_greedy, random_delta, store_version

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def make_engine(lm, sessions, **kwargs) -> Engine:
    source = StoreVersionSource(sessions, base_fingerprint=lm.base_fingerprint)
    return Engine(lm, source, **({"max_wait_s": 0.3} | kwargs))


async def run_all(engine: Engine, jobs: list[tuple[str, list[int]]], params=GREEDY):
    targets = [engine.target(model) for model, _ in jobs]
    return await asyncio.gather(
        *(engine.complete(ids, t, params) for (_, ids), t in zip(jobs, targets, strict=True))
    )


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_mixed_batch_matches_each_version_merged(family, sessions):
    lm = tiny_model(family)
    d1 = random_delta(lm, layer=1, seed=1)
    d2 = random_delta(lm, layer=2, seed=2, lowrank=True)
    v1 = store_version(sessions, lm, d1, name="v1")
    store_version(sessions, lm, d2, name="v2", parent=v1)  # chain: v2 = base + d1 + d2
    engine = make_engine(lm, sessions)
    try:
        prompt = engine.encode_text("Tell me how to do it.")
        short = engine.encode_text("Hi!")
        jobs = [("base", prompt), ("v1", prompt), ("v2", prompt), ("v1", short), ("base", short)]
        results = asyncio.run(run_all(engine, jobs))
        assert engine.batch_sizes == [len(jobs)]  # all of them in ONE batch
        assert engine.cache.loads == 2
    finally:
        engine.close()  # removes the hooks: the reference below runs on the plain model
    chains = {"base": [], "v1": [d1], "v2": [d1, d2]}
    for (model, ids), result in zip(jobs, results, strict=True):
        expected = merged_greedy(lm, ids, chains[model], GREEDY.max_tokens)
        assert list(result.token_ids) == expected, model
        assert result.prompt_tokens == len(ids)
        assert result.completion_tokens == len(expected)
    # The deltas matter: the three arms disagree on the same prompt.
    assert len({r.token_ids for r in results[:3]}) == 3


def test_unknown_retired_latest_and_cache_eviction(sessions):
    lm = tiny_model("llama")
    engine = make_engine(lm, sessions, poll_s=0.05)
    engine.start_polling()
    try:
        with pytest.raises(UnknownModelError):
            engine.target("latest")
        with pytest.raises(UnknownModelError):
            engine.target("nope")
        store_version(sessions, lm, random_delta(lm, layer=0, seed=3), name="fresh")
        assert engine.target("fresh").name == "fresh"  # servable at once, no restart
        assert engine.target("latest").name == "fresh"
        version_id = engine.resolve("fresh").id
        assert version_id in engine.cache
        with sessions() as session:
            crud.retire_version(session=session, name="fresh")
        deadline = time.monotonic() + 5
        while version_id in engine.cache and time.monotonic() < deadline:
            time.sleep(0.05)
        assert version_id not in engine.cache
        with pytest.raises(UnknownModelError):
            engine.target("fresh")
    finally:
        engine.close()


def test_lru_cache_keeps_size(sessions):
    lm = tiny_model("llama")
    for i in range(3):
        store_version(sessions, lm, random_delta(lm, layer=i, seed=i), name=f"v{i}")
    engine = make_engine(lm, sessions, cache_size=2)
    try:
        for name in ("v0", "v1", "v2", "v0"):
            engine.target(name)
        assert len(engine.cache) == 2
        assert engine.cache.loads == 4  # v0 was evicted by v2, then read again
    finally:
        engine.close()


def test_corrupt_or_foreign_delta_is_refused(sessions):
    lm = tiny_model("llama")
    other = tiny_model("llama", seed=7)
    store_version(sessions, other, random_delta(other, layer=1, seed=1), name="foreign")
    engine = make_engine(lm, sessions)
    try:
        with pytest.raises(ModelLoadError, match="base"):
            engine.target("foreign")
    finally:
        engine.close()


def test_streaming_stop_strings_and_seeded_sampling(sessions):
    lm = tiny_model("llama")
    engine = make_engine(lm, sessions, max_wait_s=0.0)
    try:
        ids = engine.encode_text("abc")
        base = engine.target("base")

        async def collect(params):
            deltas, final = [], None
            async for event in engine.stream(ids, base, params):
                if isinstance(event, TextDelta):
                    deltas.append(event.text)
                else:
                    final = event
            return deltas, final

        deltas, final = asyncio.run(collect(SamplingParams(max_tokens=8, temperature=0.0)))
        assert "".join(deltas) == final.text and final.finish_reason == "length"
        assert final.completion_tokens == 8
        stop = final.text[3:5]
        if stop.strip():
            cut, done = asyncio.run(collect(SamplingParams(8, 0.0, stop=(stop,))))
            assert done.text == final.text[: final.text.find(stop)]
            assert done.finish_reason == "stop" and "".join(cut) == done.text
        sampled = SamplingParams(max_tokens=8, temperature=1.5, top_p=0.9, seed=42)
        first = asyncio.run(collect(sampled))[1]
        second = asyncio.run(collect(sampled))[1]
        assert first.token_ids == second.token_ids
    finally:
        engine.close()


def test_budget_and_long_prompt(sessions):
    lm = tiny_model("llama")  # context 256
    engine = make_engine(lm, sessions, max_tokens=20)
    try:
        assert engine.token_budget([1] * 10, None) == 20
        assert engine.token_budget([1] * 10, 5) == 5
        assert engine.token_budget([1] * 250, 100) == 6
        with pytest.raises(PromptTooLongError, match="context"):
            engine.token_budget([1] * 256, 5)
    finally:
        engine.close()


def test_cancelled_request_leaves_the_batch(sessions):
    lm = tiny_model("llama")
    engine = make_engine(lm, sessions, max_wait_s=0.2)
    try:
        ids = engine.encode_text("hello")
        base = engine.target("base")
        params = SamplingParams(max_tokens=200, temperature=0.0)

        async def scenario():
            stream = engine.stream(ids, base, params)
            other = asyncio.create_task(engine.complete(ids, base, params))
            await anext(stream)  # the first token arrived: then the client goes away
            await stream.aclose()
            return await other

        result = asyncio.run(scenario())
        assert result.completion_tokens == 200 or result.finish_reason == "stop"
        assert engine.batch_sizes == [2]
    finally:
        engine.close()


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_hooks_equal_merged_weights_for_weight_and_bias_deltas(family):
    """Linear (OPT fc2) and Conv1D (GPT-2 c_proj) with weight and bias deltas: per-row hooks
    give the logits of the merged weights, and rows without a version give the base's."""
    lm = tiny_model(family)
    adapter = lm.adapter
    weight = adapter.mlp_out_param_name(1)
    bias = weight.removesuffix("weight") + "bias"
    params = dict(lm.model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    rows, cols = params[weight].shape
    delta = Delta(
        {
            weight: LowRankUpdate(
                a=torch.randn(2, cols, generator=gen), b=torch.randn(rows, 2, generator=gen)
            ),
            bias: DenseUpdate(torch.randn(*params[bias].shape, generator=gen)),
        }
    )
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.inference_mode():
        base = lm.model(input_ids=ids).logits
        with applied(lm.model, [delta]):
            merged = lm.model(input_ids=ids).logits
        hooks = BatchDeltaHooks(lm.model)
        with hooks.using(hooks.plan([version_weights(lm.model, "v", [delta]), None])):
            mixed = lm.model(input_ids=ids).logits
        assert torch.equal(lm.model(input_ids=ids).logits, base)  # outside `using`: the base
        hooks.remove()
    torch.testing.assert_close(mixed[0], merged[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=0)
    assert not torch.allclose(merged[0], base[0], atol=1e-3)


def _penalised_greedy(lm, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    """Reference: one full forward per token (no cache, no batch), OpenAI's penalties written
    out: logit - frequency * count - presence * (count > 0) + bias, then the argmax."""
    tokens: list[int] = []
    end = lm.tokenizer.eos_token_id
    with torch.inference_mode():
        for _ in range(params.max_tokens):
            logits = lm.model(input_ids=torch.tensor([prompt_ids + tokens])).logits[0, -1].float()
            for token in set(tokens):
                count = tokens.count(token)
                logits[token] -= params.frequency_penalty * count + params.presence_penalty
            for token, bias in params.logit_bias:
                logits[token] += bias
            tokens.append(int(logits.argmax()))
            if tokens[-1] == end:
                break
    return tokens


def test_penalties_and_logit_bias_match_a_plain_greedy_loop(sessions):
    lm = tiny_model("llama")
    engine = make_engine(lm, sessions)
    plain = SamplingParams(max_tokens=16, temperature=0.0)
    shaped = SamplingParams(
        max_tokens=16, temperature=0.0, presence_penalty=0.4, frequency_penalty=0.9,
        logit_bias=((40, 0.5), (41, -100.0)),
    )  # fmt: skip
    forcing = SamplingParams(max_tokens=5, temperature=0.7, seed=1, logit_bias=((7, 100.0),))

    async def run(prompt: list[int]):
        base = engine.target("base")
        return await asyncio.gather(
            *(engine.complete(prompt, base, params) for params in (plain, shaped, forcing))
        )

    try:
        prompt = engine.encode_text("Tell me how to do it.")
        *results, forced = asyncio.run(run(prompt))
    finally:
        engine.close()
    assert list(results[0].token_ids) == _penalised_greedy(lm, prompt, plain)
    assert list(results[1].token_ids) == _penalised_greedy(lm, prompt, shaped)
    assert results[0].token_ids != results[1].token_ids  # the penalties changed the answer
    assert 41 not in results[1].token_ids
    assert list(forced.token_ids) == [7] * 5  # sampling sees the bias too


def test_logprobs_are_the_models_own_for_each_token_with_the_likeliest(sessions):
    lm = tiny_model("llama")
    engine = make_engine(lm, sessions)
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=3, logit_bias=((9, 0.5),))
    try:
        prompt = engine.encode_text("Tell me")
        result = asyncio.run(engine.complete(prompt, engine.target("base"), params))
    finally:
        engine.close()
    taken = [t for t in result.token_ids if t != lm.tokenizer.eos_token_id]
    assert [e.token for e in result.logprobs] == taken
    with torch.inference_mode():  # reference: a plain forward over prompt + answer, no cache
        logits = lm.model(input_ids=torch.tensor([prompt + taken])).logits[0].float()
    want = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(taken)], dim=-1)
    for i, entry in enumerate(result.logprobs):
        assert entry.logprob == pytest.approx(float(want[i, entry.token]), abs=1e-4)
        assert len(entry.top) == 3
        values, ids = want[i].topk(3)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_a_version_added_is_held_until_dropped(sessions):
    lm = tiny_model("llama")
    store_version(sessions, lm, random_delta(lm, layer=1, seed=1), name="held")
    engine = make_engine(lm, sessions)
    try:
        info = engine.resolve("held")
        weights = engine.add_version(info)
        assert info.id in engine.cache and engine.add_version(info) is weights  # loaded once
        engine.drop_version(info.id)
        assert info.id not in engine.cache
        engine.drop_version(info.id)  # not held: nothing to do
    finally:
        engine.close()
