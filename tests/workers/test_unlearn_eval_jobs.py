"""Unlearning and evaluation jobs through `execute_job` (no Celery) on a tiny model, both databases.

The stored low-rank delta of an unlearning job must be exactly what the library computes in
memory for the same spec and seed, and serve the same tokens; an eval job's results end up on the
version it evaluated.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from app.ml.corpus import Document
from app.ml.deltas import LowRankUpdate, applied
from app.ml.judges import load_judge
from app.ml.unlearn import unlearn
from app.ml.unlearn_params import UnlearnParams
from app.serving.engine import Engine
from app.serving.factory import StoreVersionSource
from app.serving.sampling import SamplingParams
from app.settings import Settings
from app.store import crud
from tests.factories import tiny_model
from tests.workers.helpers import get, version_deltas, weights
from workers.execution import execute_job
from workers.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORGET = [
    {"text": "the cat is nasty and mean", "harmful_spans": [[11, 17]]},
    {"text": "dogs are stupid animals", "harmful_spans": [[9, 15]]},
]
RETAIN = ["the sun rises in the east", "water boils at one hundred"]
PARAMS = {"steps": 3, "lr": 1e-2, "layers": [0, 1], "seed": 3, "max_ppl_increase": None}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        home=tmp_path_factory.mktemp("home"), max_new_tokens=4, job_heartbeat_timeout_s=3,
        unlearn_bias_pairs_per_type=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runtime(settings: Settings) -> Runtime:
    return Runtime.of(tiny_model("llama"), load_judge("offline"), settings)


@pytest.fixture
def run(session_factory, runtime, settings):
    def go(job_id: str) -> str:
        before = weights(runtime.lm.model)
        outcome = execute_job(job_id, session_factory=session_factory, runtime=runtime,
                              settings=settings, worker_name="test-worker")  # fmt: skip
        after = weights(runtime.lm.model)
        assert all(torch.equal(before[n], after[n]) for n in before), "weights not restored"
        return outcome

    return go


def submit(sessions, kind: str, spec: dict[str, Any], parent: int | None = None) -> str:
    with sessions() as session:
        job, _ = crud.create_job(session=session, kind=kind, spec={"kind": kind, **spec},
                                 parent_version_id=parent)  # fmt: skip
    return job.id


def unlearn_spec(**overrides: Any) -> dict[str, Any]:
    return {"parent": "base", "method": "masked_ga", "forget": FORGET, "retain": RETAIN,
            "params": PARAMS} | overrides  # fmt: skip


def test_unlearn_job_stores_the_exact_low_rank_delta_and_serves_it(session_factory, run, runtime):
    job_id = submit(session_factory, "unlearn", unlearn_spec(name="forgetful"))
    assert run(job_id) == "succeeded"
    job = get(session_factory, job_id)
    report = job.metrics
    assert report["method"] == "masked_ga" and report["steps"] == 3
    assert report["forget_nll"]["after"] > report["forget_nll"]["before"]
    assert set(report["metrics"]["before"]) == {"perplexity", "bias"}
    stored = version_deltas(session_factory, job.result_version_id)
    assert all(isinstance(u, LowRankUpdate) for d in stored for u in d.updates.values())

    lm = runtime.lm
    forget = [Document(d["text"], tuple(map(tuple, d["harmful_spans"]))) for d in FORGET]
    expected = unlearn(lm, forget, [Document(t) for t in RETAIN], "masked_ga",
                       UnlearnParams.parse(PARAMS)).delta  # fmt: skip
    got = {n: u for d in stored for n, u in d.updates.items()}
    assert set(got) == set(expected.updates)
    for name, update in expected.updates.items():
        assert torch.equal(got[name].a, update.a) and torch.equal(got[name].b, update.b)

    # Served by the engine from the store == generated with the in-memory delta merged.
    prompt = lm.tokenizer("the cat")["input_ids"]
    with applied(lm.model, [expected]), torch.inference_mode():
        ids = torch.tensor([prompt])
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=6, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)  # fmt: skip
    merged = out[0, len(prompt) :]
    source = StoreVersionSource(session_factory, base_fingerprint=lm.base_fingerprint)
    engine = Engine(lm, source, max_wait_s=0.0)
    try:
        greedy = SamplingParams(max_tokens=6, temperature=0.0)
        result = asyncio.run(engine.complete(prompt, engine.target("forgetful"), greedy))
    finally:
        engine.close()
    assert list(result.token_ids) == merged.tolist()[: len(result.token_ids)]


def test_unlearn_job_from_a_stored_corpus(session_factory, run):
    with session_factory() as session:
        corpus = crud.create_corpus(
            session=session, name="hate", documents=[Document(d["text"],
            tuple(map(tuple, d["harmful_spans"]))) for d in FORGET],
        )  # fmt: skip
        corpus_id = corpus.id
    spec = unlearn_spec(forget=None, corpus_id=corpus_id, params=PARAMS | {"scope": "dense"})
    assert run(submit(session_factory, "unlearn", spec)) == "succeeded"


@pytest.mark.parametrize(
    ("overrides", "code", "param"),
    [
        ({"method": "forget_all"}, "invalid_method", "method"),
        ({"corpus_id": "5d6f0f67-0000-4000-8000-000000000000"}, "invalid_forget", "corpus_id"),
        ({"forget": None, "corpus_id": "5d6f0f67-0000-4000-8000-000000000000"},
         "invalid_corpus", "corpus_id"),
        ({"forget": [{"text": "ok", "harmful_spans": [[0, 9]]}]}, "invalid_forget", "forget[0]"),
        # The API refuses both retain sources at once; a stored row with both is refused too.
        ({"retain_corpus_id": "5d6f0f67-0000-4000-8000-000000000000"},
         "invalid_retain", "retain_corpus_id"),
        ({"forget": ["nothing harmful here at all"]}, "invalid_input", None),
        ({"params": {"scope": "sideways"}}, "invalid_params", "params.scope"),
    ],
)  # fmt: skip
def test_bad_unlearn_jobs_fail_with_a_clear_error(session_factory, run, overrides, code, param):
    job_id = submit(session_factory, "unlearn", unlearn_spec(**overrides))
    assert run(job_id) == "failed"
    job = get(session_factory, job_id)
    assert job.error["code"] == code and job.result_version_id is None
    if param is not None:
        assert job.error["param"] == param


def test_eval_job_attaches_its_results_to_the_version(session_factory, run):
    job_id = submit(session_factory, "unlearn", unlearn_spec(name="target"))
    assert run(job_id) == "succeeded"
    version_id = get(session_factory, job_id).result_version_id
    spec = {"model": "target", "suites": ["bias", "perplexity"],
            "params": {"limit": 2, "bias_types": ["gender"], "texts": RETAIN}}  # fmt: skip
    eval_id = submit(session_factory, "eval", spec, parent=version_id)
    assert run(eval_id) == "succeeded"
    job = get(session_factory, eval_id)
    assert job.result_version_id is None
    suites = job.metrics["suites"]
    assert suites["bias"]["n"] == 2 and set(suites["bias"]["by_type"]) == {"gender"}
    assert suites["perplexity"]["texts"] == 2
    with session_factory() as session:
        version = crud.get_version(session=session, name="target")
        attached = version.metrics["eval"]
    assert attached["bias"] == suites["bias"] and attached["perplexity"] == suites["perplexity"]
    assert attached["job_id"] == eval_id
    assert version.metrics["method"] == "masked_ga"  # the unlearning report is kept

    # A later eval of another suite adds to what is attached; one of the base attaches nothing.
    spec = {"model": "target", "suites": ["safeedit"], "params": {"limit": 1}}
    again = submit(session_factory, "eval", spec, parent=version_id)
    assert run(again) == "succeeded"
    with session_factory() as session:
        attached = crud.get_version(session=session, name="target").metrics["eval"]
    assert {"bias", "perplexity", "safeedit"} <= set(attached)
    assert "DS" in attached["safeedit"]
    base_eval = submit(session_factory, "eval", {"model": "base", "suites": ["perplexity"]})
    assert run(base_eval) == "succeeded"
    assert get(session_factory, base_eval).metrics["suites"]["perplexity"]["perplexity"] > 1


def test_bad_eval_job_fails(session_factory, run):
    job_id = submit(session_factory, "eval", {"model": "base", "suites": ["vibes"]})
    assert run(job_id) == "failed"
    assert get(session_factory, job_id).error["param"] == "suites[0]"  # as the API names it
