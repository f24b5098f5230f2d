"""Load: `--requests` concurrent generation requests over base and versions, against a real
`detox api` process on loopback (demo model by default), in `--waves` waves. Every request must
be answered (200) or refused with 429/503 and `Retry-After`; none may hang (a client timeout
counts as hung). Prints the answers by status, requests/s, p50/p99 latency and the server's
resident memory (peak, sampled every 50 ms) before and during each wave.

Bounded and loopback only: the requests are `--requests` x `--waves`, each with a timeout.

    .venv/bin/python bench/load.py [--requests 200] [--keys 4] [--waves 2] [--tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from harness import bench_headers, free_port, server_env, start_server, write_versions

from app.ml.models import load_model
from app.store import migrate
from app.store.db import make_engine, make_sessionmaker

PROMPTS = [
    "Write a haiku about the sea.",
    "How do I pick a lock?",
    "Give me three tips for a job interview.",
    "What is the capital of France?",
]


class MemorySampler:
    """The peak RSS of a process, sampled on a thread while inside."""

    def __init__(self, process: psutil.Process, every_s: float = 0.05):
        self.process, self.every_s = process, every_s
        self.peak = process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.process.memory_info().rss)


async def one(client: httpx.AsyncClient, i: int, key: str, models: list[str], tokens: int,
              timeout: float) -> tuple[str, float, bool]:  # fmt: skip
    """(outcome, seconds, has Retry-After) of request i."""
    body = {
        "model": models[i % len(models)],
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": tokens,
        "temperature": 0,
    }
    start = time.perf_counter()
    try:
        response = await client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
        )  # fmt: skip
    except httpx.TimeoutException:
        return "hung", time.perf_counter() - start, False
    except httpx.TransportError as exc:
        return f"transport error ({type(exc).__name__})", time.perf_counter() - start, False
    return str(response.status_code), time.perf_counter() - start, "retry-after" in response.headers


async def wave(url: str, keys: list[str], args: argparse.Namespace, models: list[str]):
    limits = httpx.Limits(max_connections=args.requests, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(
            one(client, i, keys[i % len(keys)], models, args.tokens, args.timeout)
            for i in range(args.requests)
        ))  # fmt: skip
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def make_keys(url: str, count: int) -> list[str]:
    with httpx.Client(base_url=url, headers=bench_headers(), timeout=30) as http:
        return [
            http.post("/v1/keys", json={"name": f"load-{i}", "role": "reader"}).json()["key"]
            for i in range(count)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=200, help="concurrent requests a wave")
    parser.add_argument("--waves", type=int, default=2)
    parser.add_argument("--keys", type=int, default=4, help="API keys the requests spread over")
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300.0, help="a request slower hangs")
    parser.add_argument("--max-pending", type=int, default=None,
                        help="DETOX_SERVING_MAX_PENDING (default: the server's)")  # fmt: skip
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="detox-bench-load-"))
    db = f"sqlite:///{tmp / 'load.db'}"
    migrate.upgrade(db)
    lm = load_model(args.model, device=args.device)
    write_versions(make_sessionmaker(make_engine(db)), lm, args.versions, 1e-3)
    del lm
    env = server_env(tmp / "home", db, args.model, args.device, SERVING_PRELOAD="true")
    if args.max_pending is not None:
        env["DETOX_SERVING_MAX_PENDING"] = str(args.max_pending)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(env, port)
    server = psutil.Process(proc.pid)
    models = ["base", *(f"v{i + 1}" for i in range(args.versions))]
    rows = []
    try:
        keys = make_keys(url, args.keys)
        asyncio.run(wave(url, keys[:1], argparse.Namespace(**{**vars(args), "requests": 4}),
                         models))  # warm-up: every model loaded once  # fmt: skip
        for n in range(args.waves):
            before = server.memory_info().rss
            with MemorySampler(server) as memory:
                results, seconds = asyncio.run(wave(url, keys, args, models))
            rows.append((n + 1, results, seconds, before, memory.peak))
    finally:
        proc.terminate()
        proc.wait(30)

    over = ", ".join(models)
    where = f"{args.model} on {args.device}"
    print(f"\nload: {args.requests} concurrent chat requests a wave over {over} "
          f"({args.keys} keys, {args.tokens} new tokens), {where}")  # fmt: skip
    print(
        "| wave | 200 | 429 | 503 | other | hung | refusals w/o Retry-After | answered/s | "
        "p50 ok | p99 ok | p50 refused | p99 refused | RSS before | RSS peak |"
    )
    print("|" + "---|" * 14)
    for n, results, seconds, before, peak in rows:
        counts = Counter(outcome for outcome, _, _ in results)
        ok = [s for o, s, _ in results if o == "200"]
        refused = [s for o, s, _ in results if o in ("429", "503")]
        bare = sum(1 for o, _, retry in results if o in ("429", "503") and not retry)
        other = sum(v for k, v in counts.items() if k not in ("200", "429", "503", "hung"))
        answered = len(results) - counts["hung"]
        print(f"| {n} | {counts['200']} | {counts['429']} | {counts['503']} | {other} | "
              f"{counts['hung']} | {bare} | {answered / seconds:.1f} | "
              f"{statistics.median(ok) if ok else float('nan'):.2f} s | "
              f"{percentile(ok, 0.99):.2f} s | "
              f"{statistics.median(refused) if refused else float('nan'):.3f} s | "
              f"{percentile(refused, 0.99):.3f} s | {before / 2**20:.0f} MiB | "
              f"{peak / 2**20:.0f} MiB |")  # fmt: skip
        for outcome, count in sorted(counts.items()):
            if outcome not in ("200", "429", "503", "hung"):
                print(f"  other outcome {outcome!r}: {count}")


if __name__ == "__main__":
    main()
