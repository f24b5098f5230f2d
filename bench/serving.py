"""Benchmark: the serving engine through HTTP, on the demo model (or `--model`). Prints a table.

(a) one stream through HTTP vs raw `model.generate` on the same loaded model, tokens/s;
(b) `--clients` concurrent clients spread over base and 3 versions vs the same requests one after
    another, aggregate tokens/s;
(c) resident memory with 1 and with `--versions` versions loaded, against the deltas' own size;
(d) time to first token for a version not yet cached, and for a cached one.

The server is a real `detox api` process (loopback) on a temporary SQLite store whose versions are
written the way a worker writes them (random dense deltas on each layer's MLP output projection);
raw `model.generate` runs in this process while the server is idle.

    .venv/bin/python bench/serving.py [--model demo] [--tokens 32] [--clients 8] [--versions 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import torch
from harness import (
    PROMPT,
    bench_headers,
    free_port,
    server_env,
    start_server,
    stream_chat,
    write_versions,
)

from app.ml.models import load_model
from app.store import migrate
from app.store.db import make_engine, make_sessionmaker


def _raw_generate(lm, tokens: int) -> tuple[float, int]:
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(lm.device)
    with torch.inference_mode():
        start = time.perf_counter()
        out = lm.model.generate(
            **ids, max_new_tokens=tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
        )
        seconds = time.perf_counter() - start
    return seconds, out.shape[1] - ids["input_ids"].shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="runs of (a) and (b), best kept")
    parser.add_argument("--scale", type=float, default=1e-3, help="size of the random deltas")
    parser.add_argument(
        "--max-wait-ms", type=float, default=50.0, help="the batcher's wait for more requests"
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="detox-bench-serving-"))
    url = f"sqlite:///{tmp / 'bench.db'}"
    migrate.upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    lm = load_model(args.model, device=args.device)
    print(f"model {args.model} on {lm.device} ({lm.dtype}); writing {args.versions} versions",
          file=sys.stderr)  # fmt: skip
    sizes = write_versions(sessions, lm, args.versions + 1, args.scale)
    env = server_env(
        tmp / "home", url, args.model, args.device,
        SERVING_CACHE_SIZE=str(max(8, args.versions + 4)),
        SERVING_MAX_BATCH_SIZE=str(args.clients),
        SERVING_MAX_WAIT_MS=str(args.max_wait_ms),
        SERVING_MAX_TOKENS=str(args.tokens),
        RATE_LIMIT_PER_MINUTE="0",
    )  # fmt: skip
    port = free_port()
    proc = start_server(env, port)
    server = psutil.Process(proc.pid)
    rows: list[tuple[str, str, str]] = []
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600, headers=bench_headers())
    try:
        stream_chat(client, "base", 4)  # warm-up: builds the engine
        _raw_generate(lm, 4)

        # (c) the server's resident memory with 1 and with N versions loaded
        stream_chat(client, "v1", 1)
        rss1 = server.memory_info().rss
        for i in range(2, args.versions + 1):
            stream_chat(client, f"v{i}", 1)
        rssn = server.memory_info().rss
        extra = sum(sizes[1 : args.versions])
        grown = rssn - rss1
        ratio = grown / max(extra, 1)
        rows.append(("(c) server RSS, 1 version loaded", f"{rss1 / 2**20:.0f} MiB", ""))
        rows.append((f"(c) server RSS, {args.versions} versions loaded", f"{rssn / 2**20:.0f} MiB",
                     f"+{grown / 2**20:.1f} MiB for {args.versions - 1} deltas of "
                     f"{extra / 2**20:.1f} MiB ({ratio:.2f}x; target <= 1.05x)"))  # fmt: skip

        # (a) one stream vs raw generate: interleaved, best of `--repeat` (the CPU is shared)
        raw_tps = http_tps = 0.0
        for _ in range(args.repeat):
            raw_s, raw_n = _raw_generate(lm, args.tokens)
            _, http_s, http_n = stream_chat(client, "base", args.tokens)
            raw_tps, http_tps = max(raw_tps, raw_n / raw_s), max(http_tps, http_n / http_s)
        rows.append(("(a) raw model.generate, 1 stream", f"{raw_tps:.1f} tok/s",
                     f"best of {args.repeat}"))  # fmt: skip
        rows.append(("(a) HTTP stream, 1 client", f"{http_tps:.1f} tok/s",
                     f"ratio {http_tps / raw_tps:.2f} (target >= 0.9)"))  # fmt: skip

        # (b) concurrent clients over base + 3 versions vs one after another
        models = [("base", "v1", "v2", "v3")[i % 4] for i in range(args.clients)]
        for m in set(models):
            stream_chat(client, m, 2)  # load the versions first: (b) measures generation
        seq_tps = conc_tps = 0.0
        for _ in range(args.repeat):
            start = time.perf_counter()
            sequential = sum(stream_chat(client, m, args.tokens)[2] for m in models)
            seq_tps = max(seq_tps, sequential / (time.perf_counter() - start))
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                results = list(pool.map(lambda m: stream_chat(client, m, args.tokens), models))
            conc_tps = max(conc_tps, sum(r[2] for r in results) / (time.perf_counter() - start))
        rows.append((f"(b) {args.clients} requests one after another", f"{seq_tps:.1f} tok/s", ""))
        rows.append((f"(b) {args.clients} concurrent clients, 4 models", f"{conc_tps:.1f} tok/s",
                     f"speed-up {conc_tps / seq_tps:.2f}x (target >= 3x)"))  # fmt: skip

        # (d) time to first token: a version not yet cached, then cached
        fresh = f"v{args.versions + 1}"  # written, never requested so far
        cold = stream_chat(client, fresh, 4)[0]
        warm = stream_chat(client, fresh, 4)[0]
        rows.append(("(d) first token, version not cached", f"{cold * 1000:.0f} ms",
                     f"cached: {warm * 1000:.0f} ms"))  # fmt: skip

    finally:
        client.close()
        proc.terminate()
        proc.wait(30)
    width = max(len(r[0]) for r in rows)
    print(f"\nserving benchmark: {args.model} on {lm.device}, {args.tokens} new tokens "
          f"per request, batcher wait {args.max_wait_ms:g} ms")  # fmt: skip
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>14}  {note}")


if __name__ == "__main__":
    main()
