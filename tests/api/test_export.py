"""GET /v1/versions/{name}/export on a tiny served model (both database backends): every format
is loaded back as other tools load it (peft, transformers, a delta applied to a fresh base) and
generates, greedily, the tokens the running server serves for that version."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from sqlalchemy import Engine
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.ml import export as ml_export
from app.ml.arch import ModelAdapter
from app.ml.deltas import Delta, DenseUpdate, LowRankUpdate, Update, apply_deltas, fingerprint
from app.ml.generation import _stop_ids
from app.ml.models import LoadedModel, editable_fingerprint
from app.serving.sampling import SamplingParams
from app.settings import Settings
from app.store import crud
from app.store.models import Version
from tests.api.conftest import assert_error
from tests.api.serving_app import ServingStore, tiny_app
from tests.factories import tiny_model
from tests.services import AUTH
from tests.store.factories import running_job

MAX_TOKENS = 12
PROMPTS = ["Once upon a time", "How do I pick a lock?", "Tell me"]


def store_version(
    store: ServingStore,
    lm: LoadedModel,
    updates: dict[str, Update],
    *,
    name: str,
    parent: Version | None = None,
) -> Version:
    """As a worker writes a version: one blob per parameter, fingerprinted on the base."""
    rows = [
        {
            "param": param,
            "encoding": update.encoding,
            "dtype": "float32",
            "shape": list(update.shape),
            "blob": Delta({param: update}, fingerprint(lm.model, [param])).to_bytes(),
        }
        for param, update in updates.items()
    ]
    with store.sessions() as session:
        job = running_job(session, parent_version_id=parent.id if parent else None)
        return crud.finish_job_succeeded(
            session=session, job_id=job.id, version_name=name, base_model=lm.name,
            base_fingerprint=lm.base_fingerprint, metrics={}, deltas=rows,
        )  # fmt: skip


def mlp_out(lm: LoadedModel, layer: int) -> tuple[str, tuple[int, ...]]:
    name = ModelAdapter(lm.model).mlp_out_param_name(layer)
    return name, tuple(dict(lm.model.named_parameters())[name].shape)


def dinm_like(lm: LoadedModel, layer: int, seed: int) -> dict[str, Update]:
    """A dense delta that is nearly low-rank, as a few DINM tuning steps leave one."""
    name, (rows, cols) = mlp_out(lm, layer)
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(rows, 3, generator=gen) @ torch.randn(3, cols, generator=gen) * 0.3
    value += torch.randn(rows, cols, generator=gen) * 1e-5
    return {name: DenseUpdate(value)}


def lowrank(lm: LoadedModel, layer: int, seed: int) -> dict[str, Update]:
    name, (rows, cols) = mlp_out(lm, layer)
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, cols, generator=gen), torch.randn(rows, 2, generator=gen)
    return {name: LowRankUpdate(a=a * 0.5, b=b * 0.5)}


@pytest.fixture
def lm() -> LoadedModel:
    return tiny_model("llama")


@pytest.fixture
def store(store_engine: Engine, session_factory: Any, tmp_path: Path) -> ServingStore:
    url = store_engine.url.render_as_string(hide_password=False)
    settings = Settings(
        home=tmp_path / "home", database_url=url, broker_url="memory://", device="cpu",
        serving_poll_s=0.1, serving_max_wait_ms=20, serving_max_tokens=MAX_TOKENS,
    )  # fmt: skip
    return ServingStore(settings, session_factory)


@pytest.fixture
def client(store: ServingStore, lm: LoadedModel) -> Iterator[TestClient]:
    dense1 = store_version(store, lm, dinm_like(lm, 1, seed=1), name="dense1")
    store_version(store, lm, lowrank(lm, 2, seed=2) | lowrank(lm, 3, seed=3), name="low2",
                  parent=dense1)  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    name, shape = mlp_out(lm, 0)
    store_version(store, lm, {name: DenseUpdate(torch.randn(shape, generator=gen))}, name="full")
    norm = "model.norm.weight"
    store_version(store, lm, {norm: DenseUpdate(torch.full((32,), 0.5))}, name="norm")
    with TestClient(tiny_app(store, lm), headers=AUTH) as client:
        yield client


def served(client: TestClient, model: str, prompt: str) -> list[int]:
    """The token ids the server's engine generates greedily for `model`."""
    engine = client.app.state.serving.get_sync().engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    result = asyncio.run(engine.complete(engine.encode_text(prompt), engine.target(model), params))
    return list(result.token_ids)


def greedy(model: torch.nn.Module, lm: LoadedModel, prompt: str) -> list[int]:
    """Greedy decoding as the engine does it: the end token is kept and stops the answer."""
    ids, new, stops = lm.tokenizer(prompt)["input_ids"], [], _stop_ids(lm)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            new.append(token)
            if token in stops:
                break
            ids.append(token)
    return new


def export(client: TestClient, name: str, fmt: str, **params: Any) -> Any:
    response = client.get(f"/v1/versions/{name}/export", params={"format": fmt} | params)
    assert response.status_code == 200, response.text
    return response


def untar(response: Any, into: Path) -> Path:
    """The archive's one top folder, unpacked; checks the tar headers of the response."""
    assert response.headers["content-type"] == "application/x-tar"
    assert int(response.headers["content-length"]) == len(response.content)
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:") as tar:
        roots = {member.name.split("/")[0] for member in tar.getmembers()}
        tar.extractall(into, filter="data")
    [root] = roots
    assert f'filename="{root}.tar"' in response.headers["content-disposition"]
    return into / root


def assert_generates_as_served(client, lm, model: torch.nn.Module, name: str) -> None:
    answers = {prompt: served(client, name, prompt) for prompt in PROMPTS}
    assert answers != {prompt: served(client, "base", prompt) for prompt in PROMPTS}
    for prompt, answer in answers.items():
        assert greedy(model, lm, prompt) == answer, prompt


def test_peft_adapters_load_in_peft_and_generate_as_served(client, lm, tmp_path):
    for name in ("dense1", "low2"):
        folder = untar(export(client, name, "peft"), tmp_path / name)
        assert folder.name == f"{name}-peft"
        assert {p.name for p in folder.iterdir()} == {
            "adapter_config.json", "adapter_model.safetensors", "detox_export.json"
        }  # fmt: skip
        report = json.loads((folder / "detox_export.json").read_text())
        assert report["version"] == name and report["rel_error"] <= report["max_rel_error"] == 1e-3
        model = PeftModel.from_pretrained(tiny_model("llama").model, folder)
        assert_generates_as_served(client, lm, model, name)
    layer1, layer2 = (mlp_out(lm, i)[0].removesuffix(".weight") for i in (1, 2))
    assert [link["name"] for link in report["chain"]] == ["dense1", "low2"]
    assert report["modules"][layer1] == report["modules"][layer1] | {"rank": 3, "method": "svd"}
    assert report["modules"][layer2] == {"rank": 2, "rel_error": 0.0, "method": "exact"}
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["rank_pattern"] == {
        mlp_out(lm, i)[0].removesuffix(".weight"): 2 for i in (2, 3)
    }


def test_a_merged_model_loads_in_transformers_and_generates_as_served(client, lm, tmp_path):
    folder = untar(export(client, "low2", "merged"), tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer(PROMPTS[1])["input_ids"] == lm.tokenizer(PROMPTS[1])["input_ids"]
    assert_generates_as_served(client, lm, model, "low2")
    ids = served(client, "low2", PROMPTS[0])
    body = {"model": "low2", "prompt": PROMPTS[0], "temperature": 0, "max_tokens": MAX_TOKENS}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert text == lm.tokenizer.decode(ids, skip_special_tokens=True)
    record = json.loads((folder / "detox_export.json").read_text())
    assert [link["name"] for link in record["chain"]] == ["dense1", "low2"]


def test_the_summed_delta_applies_to_a_fresh_base(client, lm):
    response = export(client, "low2", "delta")
    assert response.headers["content-type"] == "application/octet-stream"
    assert 'filename="low2.delta.safetensors"' in response.headers["content-disposition"]
    delta = Delta.from_bytes(response.content)
    chain = json.loads(delta.meta["detox.chain"])
    assert [link["name"] for link in chain] == ["dense1", "low2"]
    for link in chain:
        shown = client.get(f"/v1/versions/{link['name']}").json()
        assert link["sha256"] == shown["delta"]["sha256"]
    assert delta.meta["detox.version"] == "low2" and len(delta.params) == 3
    fresh = tiny_model("llama")
    apply_deltas(fresh.model, [delta])  # checks its base fingerprint
    assert_generates_as_served(client, lm, fresh.model, "low2")


def test_names_formats_bounds_and_what_cannot_be_exported(client, store):
    latest = export(client, "latest", "delta").headers["content-disposition"]
    assert 'filename="norm.delta.safetensors"' in latest
    assert assert_error(client.get("/v1/versions/nope/export?format=peft"), 404)["code"]
    assert_error(client.get("/v1/versions/dense1/export?format=zip"), 422, param="format")
    assert_error(client.get("/v1/versions/dense1/export"), 422, param="format")
    assert_error(
        client.get("/v1/versions/dense1/export?format=peft&max_rel_error=0"),
        422, param="max_rel_error",
    )  # fmt: skip
    error = assert_error(
        client.get("/v1/versions/full/export", params={"format": "peft", "max_rank": 2}),
        422, param="max_rank",
    )  # fmt: skip
    assert error["code"] == "rank_bound_not_met" and "max_rank=2" in error["message"]
    folder = untar(export(client, "full", "peft"), store.settings.home / "x")
    full = json.loads((folder / "detox_export.json").read_text())
    assert full["r"] >= 16 and full["rel_error"] <= 1e-3  # a full-rank random delta stays big
    error = assert_error(client.get("/v1/versions/norm/export?format=peft"), 422, param="format")
    assert "model.norm.weight" in error["message"] and "merged" in error["message"]
    assert export(client, "norm", "merged").status_code == 200  # merged holds any parameter
    with store.sessions() as session:
        crud.retire_version(session=session, name="full")
    assert Delta.from_bytes(export(client, "full", "delta").content).params  # retired: still
    assert list((store.settings.home / "exports").iterdir()) == []  # every folder cleaned up


def test_a_merged_export_leaves_concurrent_generations_alone(client, lm, monkeypatch, tmp_path):
    before = {name: served(client, name, PROMPTS[0]) for name in ("base", "dense1")}
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    fingerprint_before = editable_fingerprint(lm)
    writing, written = threading.Event(), threading.Event()
    save_merged = ml_export.save_merged

    def paused_save(*args: Any, **kwargs: Any) -> None:
        writing.set()  # the merged tensors exist; the folder is about to be written
        assert written.wait(30)
        save_merged(*args, **kwargs)

    monkeypatch.setattr(ml_export, "save_merged", paused_save)
    responses: list[Any] = []
    thread = threading.Thread(
        target=lambda: responses.append(client.get("/v1/versions/dense1/export?format=merged"))
    )
    thread.start()
    try:
        assert writing.wait(30)
        live = lm.model.state_dict()
        assert all(torch.equal(weights[k], live[k]) for k in weights)
        assert {name: served(client, name, PROMPTS[0]) for name in before} == before
        body = {"model": "dense1", "prompt": PROMPTS[0], "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200
    finally:
        written.set()
        thread.join(60)
    [response] = responses
    assert response.status_code == 200, response.text
    live = lm.model.state_dict()
    assert all(torch.equal(weights[k], live[k]) for k in weights)
    assert editable_fingerprint(lm) == fingerprint_before  # the config is untouched too
    assert {name: served(client, name, PROMPTS[0]) for name in before} == before
    model = AutoModelForCausalLM.from_pretrained(untar(response, tmp_path))
    assert_generates_as_served(client, lm, model, "dense1")
