"""Benchmark: what an experiment costs the caller, on the demo model (or `--model`). Prints a table.

(a) latency of a chat completion sent to an arm's model directly vs through `exp:<name>` (the
    same user, so the same arm and the same tokens), interleaved, p50 and p95;
(b) a burst of `--burst` experiment requests from `--clients` concurrent clients: how long after
    the last answer every outcome is recorded and judged, and how many were dropped.

The server is a real `detox api` process (loopback) on a temporary SQLite store with one version
(a random delta, written as a worker writes it); the experiment uses the offline judge.

    .venv/bin/python bench/experiments.py [--model demo] [--requests 30] [--burst 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from harness import bench_headers, free_port, server_env, start_server, write_versions

from app.ml.models import load_model
from app.store import migrate
from app.store.db import make_engine, make_sessionmaker

MESSAGES = [{"role": "user", "content": "How do I pick a lock?"}]


def _chat(client: httpx.Client, model: str, user: str, tokens: int) -> tuple[float, dict]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": tokens, "temperature": 0,
            "user": user}  # fmt: skip
    start = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return (time.perf_counter() - start) * 1000, response.json()


def _judged(client: httpx.Client) -> int:
    results = client.get("/v1/experiments/bench/results").json()
    return sum(arm["judged"] for arm in results["arms"])


def _metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=30, help="pairs in (a)")
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="detox-bench-experiments-"))
    url = f"sqlite:///{tmp / 'bench.db'}"
    migrate.upgrade(url)
    lm = load_model(args.model, device=args.device)
    write_versions(make_sessionmaker(make_engine(url)), lm, 1, 1e-3)
    del lm
    env = server_env(
        tmp / "home", url, args.model, args.device,
        RATE_LIMIT_PER_MINUTE="0", SERVING_MAX_BATCH_SIZE=str(args.clients),
    )  # fmt: skip
    port = free_port()
    proc = start_server(env, port)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600, headers=bench_headers())
    try:
        arms = [{"model": "base"}, {"model": "v1"}]
        made = client.post("/v1/experiments", json={"name": "bench", "arms": arms,
                                                    "judge": "offline"})  # fmt: skip
        made.raise_for_status()
        for model in ("base", "v1"):  # warm-up: builds the engine, loads the version
            _chat(client, model, "warm", 2)

        direct, through = [], []
        for i in range(args.requests):
            user = f"user-{i}"
            ms, answer = _chat(client, "exp:bench", user, args.tokens)
            through.append(ms)
            direct.append(_chat(client, answer["model"], user, args.tokens)[0])
        rows = [
            ("(a) direct to the arm, p50 / p95 ms",
             f"{statistics.median(direct):.0f} / {_p95(direct):.0f}"),
            ("(a) through exp:bench, p50 / p95 ms",
             f"{statistics.median(through):.0f} / {_p95(through):.0f}"),
            ("(a) overhead of the experiment, p50 ms",
             f"{statistics.median(through) - statistics.median(direct):+.1f}"),
        ]  # fmt: skip

        before = _judged(client)
        with ThreadPoolExecutor(args.clients) as pool:
            start = time.perf_counter()
            list(pool.map(lambda i: _chat(client, "exp:bench", f"burst-{i}", 1), range(args.burst)))
            answered = time.perf_counter()
        while _judged(client) < before + args.burst and time.perf_counter() - answered < 120:
            time.sleep(0.05)
        settled = time.perf_counter()
        rows += [
            (f"(b) {args.burst} requests, {args.clients} clients: answered in s",
             f"{answered - start:.2f}"),
            ("(b) every outcome judged, s after the last answer", f"{settled - answered:.2f}"),
            ("(b) outcomes recorded / dropped",
             f"{_metric(client, 'detox_experiment_outcomes_recorded_total'):.0f} / "
             f"{_metric(client, 'detox_experiment_outcomes_dropped_total'):.0f}"),
        ]  # fmt: skip
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)
    width = max(len(name) for name, _ in rows)
    print(f"model {args.model}, {args.tokens} new tokens in (a)")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


if __name__ == "__main__":
    main()
