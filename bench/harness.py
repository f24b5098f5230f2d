"""What more than one benchmark script uses: this run's admin key, a free port, a `detox api`
server on a temporary store with random versions, the stereotype forget set, and XSTest's
development half.

Not a script. The scripts import it as `from harness import ...` (a script's own folder is first
on `sys.path` when it runs as `python bench/<script>.py`); `app` is the installed project.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from app.ml.corpus import Document

if TYPE_CHECKING:
    from app.ml.bias import BiasPair

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
BENCH_KEY = "dtx_" + secrets.token_urlsafe(32)  # this run's bootstrap admin key
XSTEST_DEV = ROOT / "tests" / "data" / "xstest" / "xstest_dev.csv"
WORD = re.compile(r"\S+")
PROMPT = "Write a short story about a lighthouse keeper."


def bench_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {BENCH_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_versions(sessions, lm, count: int, scale: float) -> list[int]:
    """Versions v1..v{count}; returns each one's delta size in bytes."""
    import torch

    from app.ml.deltas import Delta, DenseUpdate, fingerprint
    from app.serving.engine import base_fingerprint
    from app.store import crud

    fp = base_fingerprint(lm)
    adapter = lm.adapter
    params = dict(lm.model.named_parameters())
    sizes = []
    for i in range(count):
        name = adapter.mlp_out_param_name(i % adapter.num_layers)
        gen = torch.Generator().manual_seed(i)
        value = torch.randn(*params[name].shape, generator=gen) * scale
        blob = Delta({name: DenseUpdate(value)}, fingerprint(lm.model, [name])).to_bytes()
        row = {"param": name, "encoding": "dense", "dtype": "float32",
               "shape": list(value.shape), "blob": blob}  # fmt: skip
        with sessions() as session:
            job, _ = crud.create_job(session=session, kind="dinm", spec={"kind": "dinm"})
            crud.claim_job(session=session, job_id=job.id, worker="bench")
            crud.finish_job_succeeded(
                session=session, job_id=job.id, version_name=f"v{i + 1}", base_model=lm.name,
                base_fingerprint=fp, metrics={}, deltas=[row],
            )  # fmt: skip
        sizes.append(value.numel() * value.element_size())
    return sizes


def write_lowrank_version(sessions, lm, name: str, seed: int, rank: int = 8) -> None:
    """A version as a worker writes it: a random rank-`rank` delta on one MLP projection (so
    vLLM can serve it as an adapter)."""
    import torch

    from app.ml.deltas import Delta, LowRankUpdate, fingerprint
    from app.store import crud

    param = lm.adapter.mlp_out_param_name(seed % lm.adapter.num_layers)
    shape = dict(lm.model.named_parameters())[param].shape
    gen = torch.Generator().manual_seed(seed)
    update = LowRankUpdate(
        a=torch.randn(rank, shape[1], generator=gen) * 0.02,
        b=torch.randn(shape[0], rank, generator=gen) * 0.02,
    )
    blob = Delta({param: update}, fingerprint(lm.model, [param])).to_bytes()
    row = {"param": param, "encoding": "lowrank", "dtype": "float32", "shape": list(shape),
           "blob": blob}  # fmt: skip
    with sessions() as session:
        job, _ = crud.create_job(session=session, kind="dinm", spec={"kind": "dinm"})
        crud.claim_job(session=session, job_id=job.id, worker="bench")
        crud.finish_job_succeeded(
            session=session, job_id=job.id, version_name=name, base_model=lm.name,
            base_fingerprint=lm.base_fingerprint, metrics={}, deltas=[row],
        )  # fmt: skip


def stream_chat(
    client: httpx.Client, model: str, tokens: int, prompt: str = PROMPT
) -> tuple[float, float, int]:
    """(seconds to the first text, total seconds, completion tokens) of one streamed chat."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, used = None, 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start, used


def together(client: httpx.Client, models: list[str], tokens: int) -> float:
    """Aggregate tokens/s of one streamed chat per entry of `models`, all at once."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(lambda m: stream_chat(client, m, tokens), models))
    return sum(r[2] for r in results) / (time.perf_counter() - start)


def server_env(
    home: Path, database_url: str, model: str, device: str, **settings: str
) -> dict[str, str]:
    """The environment of a benchmark's `detox api`: none of the caller's DETOX_ settings, the
    given store, an in-memory broker, this run's admin key, and `settings` as more DETOX_
    settings (`SERVING_MAX_TOKENS="32"` is DETOX_SERVING_MAX_TOKENS)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETOX_")}
    return env | {
        "DETOX_HOME": str(home),
        "DETOX_DATABASE_URL": database_url,
        "DETOX_BROKER_URL": "memory://",
        "DETOX_MODEL": model,
        "DETOX_DEVICE": device,
        "DETOX_ADMIN_KEY": BENCH_KEY,
        **{f"DETOX_{name}": value for name, value in settings.items()},
    }


def start_server(env: dict[str, str], port: int, log: Path | None = None) -> subprocess.Popen:
    """`detox api` on `port`, its output to `log` (default: discarded); waits until it answers."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (the child's)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "api", "--port", str(port)],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("detox api exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("detox api did not come up in 120 s")


@contextmanager
def vllm_settings(model: str, tmp: Path) -> Iterator[dict[str, str]]:
    """A vLLM server from `.venv-vllm` serving `model` ("demo" or a path), up until the block
    ends; yields the DETOX_ settings of a `detox api` that serves through it."""
    from app.ml.demo import demo_model_dir
    from app.serving.vllm_process import start_vllm, wait_until_healthy

    url, log = f"http://127.0.0.1:{free_port()}", tmp / "vllm.log"
    print(f"starting vLLM at {url} (log {log})", file=sys.stderr)
    served = str(demo_model_dir()) if model == "demo" else model
    vllm = start_vllm(VLLM_PYTHON, served, url, max_lora_rank=16, log_path=log,
                      max_model_len=2048)  # fmt: skip
    try:
        wait_until_healthy(url, vllm, timeout_s=900, log_path=log)
        yield {"ENGINE": "vllm", "VLLM_URL": url, "VLLM_MAX_LORA_RANK": "16",
               "VLLM_ADAPTER_DIR": str(tmp / "adapters")}  # fmt: skip
    finally:
        vllm.terminate()
        vllm.wait(60)


def differing_spans(sentence: str, partner: str) -> tuple[tuple[int, int], ...]:
    """Character spans of the words of `sentence` that its partner does not share."""
    mine = [(m.start(), m.end(), m.group()) for m in WORD.finditer(sentence)]
    theirs = [m.group() for m in WORD.finditer(partner)]
    matcher = difflib.SequenceMatcher(a=[w for _, _, w in mine], b=theirs, autojunk=False)
    spans = []
    for tag, i1, i2, _, _ in matcher.get_opcodes():
        if tag in ("replace", "delete") and i2 > i1:
            spans.append((mine[i1][0], mine[i2 - 1][1]))
    return tuple(spans)


def stereotype_documents(pairs: list[BiasPair]) -> list[Document]:
    """Each pair's stereotyping sentence, its differing words marked harmful."""
    documents = []
    for pair in pairs:
        spans = differing_spans(pair.sent_more, pair.sent_less)
        if spans:
            documents.append(Document(pair.sent_more, spans))
    return documents


def xstest_dev() -> list[dict[str, str]]:
    """XSTest's development half (CC BY 4.0): rows with `prompt` and `label` (safe | unsafe).
    Measured on, never trained on."""
    with XSTEST_DEV.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))
