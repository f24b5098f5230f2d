"""The vLLM engine against real processes: a vLLM server (`make vllm`, its own venv) serving the
demo model; `detox api` + a worker with DETOX_ENGINE=vllm in front of it; and a second `detox
api` on the same state with the built-in engine, to compare with. The tests run in order: a
DINM version served through detox by vLLM as by the built-in engine, a full-rank version refused
by name, retire, vLLM killed and started again; then `detox up --engine vllm` with a vLLM that
answers, with one it starts itself, and with none installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.ml.demo import demo_model_dir
from app.serving.vllm_health import vllm_problem
from app.serving.vllm_process import start_vllm, wait_until_healthy
from tests.processes import Processes, free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
INSTANCE = json.loads((ROOT / "examples" / "safeedit_example.json").read_text())[0]
MAX_LORA_RANK = 16
START_TIMEOUT_S = 600
# The demo model's own precision, asked for by name: vLLM's CPU backend turns "auto" float32 into
# bfloat16, and the built-in API it is compared with decodes in float32.
VLLM_DTYPE = "float32"


class VllmServer:
    def __init__(self, log_path: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = log_path
        self.process = None

    def start(self) -> None:
        self.spawn()
        self.wait_healthy()

    def spawn(self) -> None:
        self.process = start_vllm(
            VLLM_PYTHON, str(demo_model_dir()), self.url, max_lora_rank=MAX_LORA_RANK,
            log_path=self.log_path, max_model_len=2048, dtype=VLLM_DTYPE,
        )  # fmt: skip

    def wait_healthy(self) -> None:
        assert self.process is not None
        wait_until_healthy(
            self.url, self.process, timeout_s=START_TIMEOUT_S, log_path=self.log_path
        )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def adapters(self) -> set[str]:
        models = httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"]
        return {m["id"] for m in models if m.get("parent")}


@dataclass
class Stack:
    vllm: VllmServer
    detox: Processes
    builtin: Processes


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """vLLM, detox in front of it and a second API with the built-in engine, started together:
    vLLM answers ~35 s after its start, time the detox processes spend loading the demo model."""
    if not VLLM_PYTHON.is_file():
        pytest.skip("vLLM is not installed: `make vllm` (the README's test command runs it)")
    server = VllmServer(tmp_path_factory.mktemp("vllm") / "vllm.log")
    detox = _detox(server, tmp_path_factory.mktemp("home"))
    builtin = _builtin(detox)
    try:
        server.spawn()
        detox.start_api()
        detox.start_worker()
        detox.wait_ready(120, path="/healthz")  # migrated: the second API may open the same state
        builtin.start_api()
        server.wait_healthy()
        detox.wait_ready(300)  # its engine answers once vLLM does
        builtin.wait_ready(300)
        yield Stack(server, detox, builtin)
    finally:
        builtin.stop()
        detox.stop()
        server.kill()


def _detox(vllm: VllmServer, home: Path) -> Processes:
    """API + worker with the vLLM engine (embedded default: SQLite and a file broker)."""
    env = {
        "DETOX_MODEL": "demo", "DETOX_ENGINE": "vllm", "DETOX_VLLM_URL": vllm.url,
        "DETOX_VLLM_MAX_LORA_RANK": str(MAX_LORA_RANK), "DETOX_SERVING_POLL_S": "0.5",
        "DETOX_VLLM_ADAPTER_DIR": str(home / "adapters"), "DETOX_MAX_NEW_TOKENS": "8",
        "DETOX_SERVING_PRELOAD": "true",
    }  # fmt: skip
    return Processes(home, env)


def _builtin(detox: Processes) -> Processes:
    """A second API on the same state, decoding with the built-in engine in vLLM's precision
    (`VLLM_DTYPE`), so the two must give the same text. Its logs are its own."""
    same_dtype = {"DETOX_ENGINE": "builtin", "DETOX_SERVING_DTYPE": VLLM_DTYPE}
    return Processes(detox.home, detox.env | same_dtype, log_prefix="builtin-")


@pytest.fixture(scope="module")
def vllm(stack: Stack) -> VllmServer:
    return stack.vllm


@pytest.fixture(scope="module")
def detox(stack: Stack) -> Processes:
    return stack.detox


@pytest.fixture(scope="module")
def builtin(stack: Stack) -> Processes:
    return stack.builtin


def _edit(service: Processes, name: str, params: dict) -> dict:
    body = {"kind": "dinm", "instance": INSTANCE, "name": name, "params": params}
    with service.http() as http:
        response = http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = service.wait_job(response.json()["id"], timeout=900)
    assert job["status"] == "succeeded", (job, service.logs())
    return job


def _ab(service: Processes, arms: list[str]) -> dict[str, dict]:
    body = {"prompt": INSTANCE["adversarial prompt"], "arms": arms, "max_tokens": 24}
    with service.http() as http:
        response = http.post("/v1/ab", json=body | {"temperature": 0}, timeout=300)
    assert response.status_code == 200, response.text
    return {arm["model"]: arm for arm in response.json()["arms"]}


def _streamed_answers(service: Processes, body: dict) -> dict[int, str]:
    answers: dict[int, str] = {}
    with service.http() as http:
        response = http.post("/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                answers[choice["index"]] = answers.get(choice["index"], "") + choice["text"]
    assert sorted(answers) == [0, 1, 2, 3], answers
    return answers


def _chat(service: Processes, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Name a red fruit."}]}
    with service.http() as http:
        body |= {"max_tokens": 8, "temperature": 0}
        return http.post("/v1/chat/completions", json=body, timeout=300)


def test_a_low_rank_dinm_version_is_served_by_vllm_as_by_the_builtin_engine(
    vllm: VllmServer, detox: Processes, builtin: Processes
):
    _edit(detox, "lowrank", {"preset": "contrastive", "rank": 8})
    by_vllm, by_builtin = _ab(detox, ["base", "lowrank"]), _ab(builtin, ["base", "lowrank"])
    assert by_vllm["lowrank"]["refused"] is True, by_vllm  # its own adversarial prompt
    assert by_vllm["base"]["refused"] is False, by_vllm  # the base model is unchanged
    for arm in ("base", "lowrank"):
        assert by_vllm[arm]["refused"] == by_builtin[arm]["refused"]
        assert by_vllm[arm]["text"] == by_builtin[arm]["text"], (by_vllm, by_builtin)
    # n answers to several prompts, streamed: each answer as the built-in engine gives it.
    body = {"model": "lowrank", "prompt": ["Name a red fruit.", INSTANCE["question"]], "n": 2,
            "max_tokens": 8, "temperature": 0, "stream": True}  # fmt: skip
    assert _streamed_answers(detox, body) == _streamed_answers(builtin, body)
    # Log-probabilities streamed chunk by chunk through vLLM: the whole answer's, in order.
    scored = {"model": "lowrank", "prompt": "Name a red fruit.", "max_tokens": 8,
              "temperature": 0, "logprobs": 2}  # fmt: skip
    with detox.http() as http:
        whole = http.post("/v1/completions", json=scored, timeout=300).json()["choices"][0]
        response = http.post("/v1/completions", json=scored | {"stream": True}, timeout=300)
    pieces = [json.loads(line[6:])["choices"] for line in response.text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    tokens = [t for choices in pieces for c in choices if c["logprobs"]
              for t in c["logprobs"]["tokens"]]  # fmt: skip
    assert tokens == whole["logprobs"]["tokens"] and len(tokens) >= 1
    assert "lowrank" in vllm.adapters()
    with detox.http() as http:
        ready = http.get("/readyz").json()["checks"]["engine"]
    assert ready == {"ok": True, "detail": f"vllm at {vllm.url}"}


def test_a_version_above_the_servers_lora_rank_is_refused_by_its_rank(detox: Processes):
    _edit(detox, "dense", {"preset": "paper", "steps": 1})  # a full-rank update: 576
    response = _chat(detox, "dense")
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "model_not_servable"
    assert "rank 576" in error["message"] and f"max_lora_rank {MAX_LORA_RANK}" in error["message"]
    assert _chat(detox, "lowrank").status_code == 200  # the others are served as before


def test_a_retired_version_is_gone_through_detox_and_from_vllm(vllm: VllmServer, detox: Processes):
    detox.client.retire_version("lowrank")
    assert _chat(detox, "lowrank").status_code == 404
    deadline = time.monotonic() + 30
    while "lowrank" in vllm.adapters() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "lowrank" not in vllm.adapters()


def test_vllm_down_is_503_and_every_live_version_comes_back_with_it(
    vllm: VllmServer, detox: Processes
):
    _edit(detox, "second", {"preset": "contrastive", "rank": 4, "steps": 2})
    vllm.kill()
    response = _chat(detox, "base")
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
    with detox.http() as http:
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["engine"]["ok"] is False
        assert http.get("/v1/versions").status_code == 200  # detox itself keeps answering
    vllm.start()
    deadline = time.monotonic() + 60
    while "second" not in vllm.adapters() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert vllm.adapters() == {"second"}  # re-registered; the retired one stays gone
    assert _chat(detox, "second").status_code == 200
    assert _chat(detox, "base").status_code == 200


def _up(tmp_path: Path, vllm_url: str, **env: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = tmp_path / "up.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DETOX_")} | {
        "DETOX_HOME": str(tmp_path / "home"), "DETOX_MODEL": "demo", "DETOX_DEVICE": "cpu",
        "DETOX_VLLM_URL": vllm_url, "DETOX_VLLM_PYTHON": str(VLLM_PYTHON), **env,
    }  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up", "--engine", "vllm", "--port", str(port)],
            cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}", log


def _ready_engine(url: str, proc: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            response = httpx.get(f"{url}/readyz", timeout=5)
            if response.status_code == 200:
                return response.json()["checks"]["engine"]
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"detox up --engine vllm never became ready:\n{log.read_text()}")


def test_up_with_the_vllm_engine_uses_a_server_that_answers(vllm: VllmServer, tmp_path: Path):
    proc, url, log = _up(tmp_path, vllm.url)
    try:
        assert _ready_engine(url, proc, log) == {"ok": True, "detail": f"vllm at {vllm.url}"}
        assert "using the vLLM server already answering" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert vllm_problem(vllm.url) is None  # not ours to stop: still serving


def test_up_with_the_vllm_engine_starts_vllm_and_stops_it_on_exit(tmp_path: Path):
    if not VLLM_PYTHON.is_file():
        pytest.skip("vLLM is not installed: `make vllm` (the README's test command runs it)")
    vllm_url = f"http://127.0.0.1:{free_port()}"
    proc, url, log = _up(tmp_path, vllm_url)
    try:
        assert _ready_engine(url, proc, log)["ok"] is True
        assert "vLLM is up at" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
    assert vllm_problem(vllm_url) is not None  # the child went with `up`


def test_up_without_vllm_installed_exits_2_saying_how_to_install_it(tmp_path: Path):
    proc, _, log = _up(tmp_path, f"http://127.0.0.1:{free_port()}", DETOX_VLLM_PYTHON="/no/vllm")
    assert proc.wait(timeout=120) == 2
    assert "make vllm" in log.read_text()
