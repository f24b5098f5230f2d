"""The whole service through HTTP: `detox api` and a worker as real processes, on PostgreSQL +
Redis and on the embedded default (SQLite + file broker), driven by the CLI's HTTP client."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from app.cli.client import DetoxClient
from tests.processes import Processes
from tests.services import redis_url

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = redis_url(8)
INSTANCE = json.loads((ROOT / "examples" / "safeedit_example.json").read_text())[0]
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module", params=["embedded", "postgres-redis"])
def service(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    new_database: Callable[[str], str],
    tiny_model_dir: Path,
) -> Iterator[Processes]:
    home = tmp_path_factory.mktemp("home")
    env = {
        "DETOX_MODEL": str(tiny_model_dir), "DETOX_MAX_NEW_TOKENS": "4",
        # An unlearning job's bias report: 2 CrowS-Pairs pairs a type, not 50 (~6 s a job here).
        "DETOX_UNLEARN_BIAS_PAIRS_PER_TYPE": "2",
    }  # fmt: skip
    if request.param == "postgres-redis":
        redis.Redis.from_url(REDIS_URL).flushdb()
        env |= {"DETOX_DATABASE_URL": new_database("postgresql"), "DETOX_BROKER_URL": REDIS_URL}
    svc = Processes(home, env)
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


def _body(**overrides: object) -> dict:
    return {
        "kind": "dinm",
        "parent": "base",
        "instance": INSTANCE,
        "params": {"steps": 2, "preset": "contrastive"},
    } | overrides


def _wait(client: DetoxClient, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not finished: {job}")


def test_twenty_concurrent_submissions_each_end_with_exactly_one_version(service: Processes):
    client = service.client
    with ThreadPoolExecutor(max_workers=20) as pool:
        submitted = list(pool.map(lambda _: client.submit_job(_body()), range(20)))
    ids = {job["id"] for job in submitted}
    assert len(ids) == 20
    finished = [_wait(client, job_id) for job_id in ids]
    assert {job["status"] for job in finished} == {"succeeded"}, service.logs()
    versions = [job["version"] for job in finished]
    assert len(set(versions)) == 20 and None not in versions
    listed = {v["name"]: v for v in client.list_versions()["data"]}
    for job in finished:
        version = listed[job["version"]]
        assert version["job_id"] == job["id"]
        assert version["delta"]["params"] and version["delta"]["bytes"] > 0


def test_stacked_versions_and_the_event_stream(service: Processes):
    client = service.client
    first = client.submit_job(_body(name=f"a-{service.port}"))
    events = [event for event, _ in client.job_events(first["id"])]
    assert events[-1] == "done" and "progress" in events
    parent = _wait(client, first["id"])["version"]
    child = _wait(client, client.submit_job(_body(parent=parent))["id"])
    grandchild = _wait(client, client.submit_job(_body(parent=child["version"]))["id"])
    assert grandchild["status"] == "succeeded", grandchild["error"]
    shown = client.get_version(grandchild["version"])
    assert shown["parent"] == child["version"]
    assert client.get_version(child["version"])["parent"] == parent
    assert shown["metrics"]["metrics"]["after"]["DS"] is not None


@pytest.mark.slow
def test_a_dinm_job_on_the_demo_model_detoxifies_its_instance(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    # 32 new tokens per evaluated answer, not 64: the two evaluations were most of the job
    # (~11 s each on this machine), and the judge's verdicts stay far from its threshold
    # (unsafe scores ~0.96 before, ~0.01 after on the adversarial prompt).
    svc = Processes(home, {"DETOX_MODEL": "demo", "DETOX_MAX_NEW_TOKENS": "32"})
    try:
        client = svc.start().client
        job = _wait(
            client, client.submit_job(_body(name="demo-v1", params={"preset": "paper"}))["id"]
        )
        assert job["status"] == "succeeded", job["error"]
        metrics = client.get_version("demo-v1")["metrics"]
        assert metrics["metrics"]["before"]["DS"] == 0.0
        assert metrics["metrics"]["after"]["DS"] == 100.0
        assert metrics["judge"] == "offline/3" and len(metrics["losses"]) == 10
    finally:
        svc.stop()


def test_corpus_unlearning_then_an_eval_job_attach_to_the_version(
    service: Processes, tmp_path: Path
):
    client = service.client
    corpus = tmp_path / "forget.jsonl"
    corpus.write_text(
        '{"text": "the cat is nasty and mean", "harmful_spans": [[11, 17]]}\n'
        '{"text": "dogs are stupid animals", "harmful_spans": [[9, 15]]}\n'
    )
    uploaded = client.upload_corpus(corpus, name=f"forget-{service.port}")
    assert uploaded["documents"] == 2
    name = f"u-{service.port}"
    job = _wait(client, client.submit_job({
        "kind": "unlearn", "parent": "base", "method": "masked_ga", "name": name,
        "corpus_id": uploaded["id"], "retain": ["the sun rises in the east"],
        "params": {"steps": 2, "lr": 1e-2, "max_ppl_increase": None, "seed": 1},
    })["id"])  # fmt: skip
    assert job["status"] == "succeeded", (job["error"], service.logs())
    version = client.get_version(name)
    assert version["delta"]["encoding"] == "lowrank" and version["metrics"]["method"] == "masked_ga"

    evaluated = _wait(client, client.submit_job({
        "kind": "eval", "model": name, "suites": ["perplexity", "bias"],
        "params": {"limit": 2, "bias_types": ["gender"]},
    })["id"])  # fmt: skip
    assert evaluated["status"] == "succeeded", evaluated["error"]
    attached = client.get_version(name)["metrics"]["eval"]
    assert attached["job_id"] == evaluated["id"]
    assert attached["perplexity"] == evaluated["metrics"]["suites"]["perplexity"]
    assert attached["bias"]["by_type"]["gender"]["n"] == 2

    served = client.chat({"model": name, "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 2})  # fmt: skip
    assert served["model"] == name
