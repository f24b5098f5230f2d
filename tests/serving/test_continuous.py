"""Continuous batching: requests that join a running batch, and prompts prefilled a chunk at a
time, give exactly the tokens, text and finish of the static engine running each one alone."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from app.serving.decoding import Cohort, Decoder
from app.serving.engine import Engine
from app.serving.factory import StoreVersionSource
from app.serving.sampling import Finished, SamplingParams
from app.serving.weights import BatchDeltaHooks
from tests.factories import tiny_model
from tests.serving.conftest import merged_greedy, random_delta, store_version


def make_engine(lm, sessions, **kwargs) -> Engine:
    source = StoreVersionSource(sessions, base_fingerprint=lm.base_fingerprint)
    return Engine(lm, source, **({"max_wait_s": 0.0} | kwargs))


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


def alone(lm, sessions, jobs) -> list[Finished]:
    """Reference: today's static engine, each request in a batch of its own."""
    engine = make_engine(lm, sessions, batching="static", max_batch_size=1)
    try:
        return [
            asyncio.run(engine.complete(ids, engine.target(model), params))
            for model, ids, params in jobs
        ]
    finally:
        engine.close()


def check(lm, sessions, chains, jobs, results: list[Finished]) -> None:
    """Each result is the static engine's alone and, without stop strings, transformers' own
    greedy generation with the version merged into the weights."""
    for job, result, expected in zip(jobs, results, alone(lm, sessions, jobs), strict=True):
        model, ids, params = job
        assert result.token_ids == expected.token_ids, job
        assert result.text == expected.text
        assert result.finish_reason == expected.finish_reason
        if not params.stop:
            assert list(result.token_ids) == merged_greedy(
                lm, ids, chains[model], params.max_tokens
            )


def versions(lm, sessions) -> dict[str, list]:
    """Two stored versions, v2 on v1; each name's chain of deltas."""
    d1, d2 = random_delta(lm, layer=1, seed=1), random_delta(lm, layer=2, seed=2, lowrank=True)
    v1 = store_version(sessions, lm, d1, name="v1")
    store_version(sessions, lm, d2, name="v2", parent=v1)
    return {"base": [], "v1": [d1], "v2": [d1, d2]}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_requests_joining_a_running_batch_give_their_tokens_alone(family, sessions):
    lm = tiny_model(family)
    chains = versions(lm, sessions)
    engine = make_engine(lm, sessions)
    encode = engine.encode_text
    long_job = ("base", encode("Tell me a long story about it."), greedy(48))
    joiners = [
        ("v1", encode("Hi!"), greedy(5)),
        ("v2", encode("A much longer prompt than the others, to pad the rest."), greedy(12)),
        ("base", encode("Why?"), greedy(20)),
        ("v1", encode("Tell me a long story about it."), greedy(30, logprobs=2)),
    ]
    try:
        # Loaded first: a version loaded while the long request decodes blocks this event loop,
        # and with a fast enough step the long request could end before any joiner is sent.
        targets = {model: engine.target(model) for model in ("base", "v1", "v2")}

        async def scenario():
            order: list[str] = []
            stream = engine.stream(long_job[1], targets["base"], long_job[2])
            await anext(stream)  # the long request is decoding: the others join it

            async def one(i, job):
                result = await engine.complete(job[1], targets[job[0]], job[2])
                order.append(f"joiner {i}")
                return result

            tasks = [asyncio.create_task(one(i, job)) for i, job in enumerate(joiners)]
            final = [event async for event in stream][-1]
            order.append("long")
            return final, await asyncio.gather(*tasks), order

        final, results, order = asyncio.run(scenario())
        assert engine.batch_sizes[0] == 1 and len(engine.batch_sizes) >= 2
    finally:
        engine.close()
    assert order[0] == "joiner 0"  # a short request did not wait for the long one's end
    check(lm, sessions, chains, [long_job, *joiners], [final, *results])
    expected = alone(lm, sessions, joiners[3:])[0]
    for got, want in zip(results[3].logprobs, expected.logprobs, strict=True):
        assert got.token == want.token and got.logprob == pytest.approx(want.logprob, abs=1e-4)


def test_chunked_prefill_stops_and_a_group_that_waits_for_room(sessions):
    lm = tiny_model("llama")
    chains = versions(lm, sessions)
    plain = alone(lm, sessions, [("base", [5, 6, 7], greedy(12))])[0]
    stop = plain.text[4:6] if plain.text[4:6].strip() else None
    jobs = [
        ("v2", list(range(5, 60)), greedy(10)),  # 55 prompt tokens: many 4-token chunks
        ("base", [5, 6, 7], greedy(12, stop=(stop,) if stop else ())),
        ("v1", list(range(20, 31)), greedy(9)),
        ("base", [8], greedy(3)),
    ]
    engine = make_engine(lm, sessions, prefill_tokens=4, max_batch_size=3)
    try:

        async def scenario():
            first = asyncio.create_task(engine.complete(jobs[0][1], engine.target("v2"),
                                                        jobs[0][2]))  # fmt: skip
            await asyncio.sleep(0)
            group = [(ids, engine.target(model), params) for model, ids, params in jobs[1:]]
            return [await first, *await engine.complete_together(group)]

        results = asyncio.run(scenario())
        # the group of 3 did not fit beside the running request: it started once there was room
        assert engine.batch_sizes == [1, 3]
    finally:
        engine.close()
    check(lm, sessions, chains, jobs, results)
    if stop:
        assert results[1].finish_reason == "stop"


def test_close_finishes_what_runs_and_refuses_more(sessions):
    lm = tiny_model("llama")
    engine = make_engine(lm, sessions)

    async def scenario():
        task = asyncio.create_task(engine.complete([5, 6], engine.target("base"), greedy(30)))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(engine.close)
        return await task

    result = asyncio.run(scenario())
    assert result.completion_tokens == 30 or result.finish_reason == "stop"


def test_a_cache_that_cannot_be_padded_keeps_its_cohort_apart():
    lm = tiny_model("mistral")
    decoder = Decoder(lm, BatchDeltaHooks(lm.model), {0}, 0)

    def cohort(layer_type) -> Cohort:
        cache = DynamicCache()
        layer = (
            layer_type(sliding_window=4)
            if layer_type is DynamicSlidingWindowLayer
            else (layer_type())
        )
        layer.lazy_initialization(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
        layer.keys, layer.values = torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8)
        cache.layers = [layer]
        return Cohort(decoder, [], cache, torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 1))

    plain = cohort(DynamicLayer)
    assert not plain.absorb(cohort(DynamicSlidingWindowLayer))
    assert plain.mask.shape == (1, 3)
    assert plain.absorb(cohort(DynamicLayer))
    assert plain.mask.shape == (2, 3) and plain.cache.layers[0].keys.shape[0] == 2
