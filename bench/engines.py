"""Benchmark: the built-in engine against the vLLM engine, side by side, through detox's HTTP API.

Both are real `detox api` processes on one temporary SQLite store (the demo model, or `--model`);
the vLLM one talks to a vLLM server started from `.venv-vllm` (`make vllm`) on a free port. For
each engine, best of `--repeat`:
- one stream: tokens/s of one greedy streamed chat on `base`;
- 8 concurrent on `base`: aggregate tokens/s of `--clients` streams at once;
- 8 mixed: the same over `base` and two versions (rank-8 random low-rank deltas, so vLLM can
  serve them as adapters);
- version to first token: a new version is written to the store, then streamed from until its
  first text arrives (the engine must notice it, load it or register it as an adapter, and
  decode), in seconds.

    .venv/bin/python bench/engines.py [--model demo] [--tokens 64] [--clients 8] [--repeat 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
from harness import (
    VLLM_PYTHON,
    bench_headers,
    free_port,
    server_env,
    start_server,
    stream_chat,
    together,
    vllm_settings,
    write_lowrank_version,
)

from app.ml.models import load_model
from app.store import migrate
from app.store.db import make_engine, make_sessionmaker


def measure(client: httpx.Client, args, new_version) -> dict[str, float]:
    """The four numbers of one engine (`new_version()` writes a fresh version, returns its name)."""
    for model in ("base", "v1", "v2"):
        stream_chat(client, model, 2)  # warm: every model loaded or registered first
    one = concurrent = mixed = 0.0
    bases = ["base"] * args.clients
    models = [("base", "v1", "v2")[i % 3] for i in range(args.clients)]
    for _ in range(args.repeat):
        _, seconds, used = stream_chat(client, "base", args.tokens)
        one = max(one, used / seconds)
        concurrent = max(concurrent, together(client, bases, args.tokens))
        mixed = max(mixed, together(client, models, args.tokens))
    started = time.perf_counter()
    name = new_version()
    while True:  # the version is written; time until its first token reaches the client
        try:
            stream_chat(client, name, 1)
            break
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 404:
                raise
            time.sleep(0.05)
    first = time.perf_counter() - started
    return {"one": one, "concurrent": concurrent, "mixed": mixed, "first_token_s": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if not VLLM_PYTHON.is_file():
        raise SystemExit("no vLLM: run `make vllm` first")

    tmp = Path(tempfile.mkdtemp(prefix="detox-bench-engines-"))
    url = f"sqlite:///{tmp / 'bench.db'}"
    migrate.upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    lm = load_model(args.model, device="cpu")
    for i in (1, 2):
        write_lowrank_version(sessions, lm, f"v{i}", seed=i)
    counter = iter(range(3, 1000))

    def new_version() -> str:
        index = next(counter)
        write_lowrank_version(sessions, lm, f"v{index}", seed=index)
        return f"v{index}"

    common = {
        "SERVING_MAX_BATCH_SIZE": str(args.clients),
        "SERVING_MAX_TOKENS": str(args.tokens),
        "RATE_LIMIT_PER_MINUTE": "0",
        "SERVING_POLL_S": "1",
    }

    def measured(engine: str, settings: dict[str, str]) -> dict[str, float]:
        port = free_port()
        env = server_env(tmp / engine, url, args.model, "cpu", **common, **settings)
        proc = start_server(env, port)
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=600, headers=bench_headers()
        )
        try:
            return measure(client, args, new_version)
        finally:
            client.close()
            proc.terminate()
            proc.wait(30)

    # The built-in engine first, before vLLM starts: an idle vLLM server still takes CPU.
    rows = {"builtin": measured("builtin", {"ENGINE": "builtin"})}
    with vllm_settings(args.model, tmp) as settings:
        rows["vllm"] = measured("vllm", settings)
    print(f"\nengines: {args.model} on the CPU, {args.tokens} new tokens per request, greedy, "
          f"best of {args.repeat}")  # fmt: skip
    print("| engine | 1 stream tok/s | 8 concurrent base tok/s | 8 mixed tok/s | mixed / base | "
          "version to first token s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for engine, r in rows.items():
        print(f"| {engine} | {r['one']:.1f} | {r['concurrent']:.1f} | {r['mixed']:.1f} | "
              f"{r['mixed'] / r['concurrent']:.3f} | {r['first_token_s']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
