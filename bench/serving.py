"""Benchmark: the serving engine through HTTP, on the demo model (or `--model`). Prints a table.

(a) one stream through HTTP vs raw `model.generate` on the same loaded model, tokens/s;
(b) `--clients` concurrent clients spread over base and 3 versions vs the same requests one after
    another, aggregate tokens/s;
(c) resident memory with 1 and with `--versions` versions loaded, against the deltas' own size;
(d) time to first token for a version not yet cached, and for a cached one;
(e) per engine configuration (static vs continuous batching, float32 vs bfloat16 weights, packed
    or not (`DETOX_SERVING_PACKED`), lean decoding steps or the model's forward
    (`DETOX_SERVING_LEAN_STEP`), and vLLM-CPU through detox where `.venv-vllm` exists), each
    its own `detox api`: one stream, 8 and 32 concurrent on base, 8 mixed over base + 2
    versions, and time to first token of short requests (one every `--short-every-s`) arriving
    behind 8 long ones, p50/p95, against the same requests on an idle server. The mixed / base
    ratio is the median over `--mixed-pairs` runs of 8 mixed each followed by 8 on base: paired,
    so that the machine's drift between the two does not count (best-of runs gave 0.82 to 1.07
    for one engine).

The server is a real `detox api` process (loopback) on a temporary SQLite store whose versions are
written the way a worker writes them (random dense deltas on each layer's MLP output projection);
raw `model.generate` runs in this process while the server is idle.

    .venv/bin/python bench/serving.py [--model demo] [--tokens 32] [--clients 8] [--versions 20]
    .venv/bin/python bench/serving.py --only-engines --tokens 64     # (e) alone
"""

from __future__ import annotations

import argparse
import statistics
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
    VLLM_PYTHON,
    bench_headers,
    free_port,
    server_env,
    start_server,
    stream_chat,
    together,
    vllm_settings,
    write_lowrank_version,
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
    parser.add_argument("--repeat", type=int, default=3, help="runs of (a), (b), (e), best kept")
    parser.add_argument("--scale", type=float, default=1e-3, help="size of the random deltas")
    parser.add_argument(
        "--max-wait-ms", type=float, default=50.0, help="the batcher's wait for more requests"
    )
    parser.add_argument("--only-engines", action="store_true", help="(e) only")
    parser.add_argument("--no-engines", action="store_true", help="(a) to (d) only")
    parser.add_argument("--long-tokens", type=int, default=160, help="(e): the long requests'")
    parser.add_argument("--short-tokens", type=int, default=8, help="(e): the short requests'")
    parser.add_argument("--shorts", type=int, default=12, help="(e): short requests per run")
    parser.add_argument("--short-every-s", type=float, default=0.4)
    parser.add_argument("--configs", action="append", help=f"(e): only these of {list(CONFIGS)}")
    parser.add_argument(
        "--mixed-pairs", type=int, default=7, help="(e): paired runs behind mixed / base"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="(e): a DETOX_ setting for every configuration, e.g. TORCH_THREADS=1",
    )  # fmt: skip
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="detox-bench-serving-"))
    url = f"sqlite:///{tmp / 'bench.db'}"
    migrate.upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    lm = load_model(args.model, device=args.device)
    if not args.only_engines:
        basics(args, tmp, url, sessions, lm)
    if not args.no_engines:
        engine_table(args, tmp, url, sessions, lm)


def basics(args, tmp: Path, url: str, sessions, lm) -> None:
    """(a) to (d), on one server with the default engine settings."""
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


SHORT_PROMPT = "Name a colour."
CONFIGS = {  # label -> DETOX_ settings of its `detox api`
    "static, float32": {"SERVING_BATCHING": "static", "SERVING_DTYPE": "float32"},
    "continuous, float32": {"SERVING_BATCHING": "continuous", "SERVING_DTYPE": "float32"},
    "static, bfloat16": {"SERVING_BATCHING": "static", "SERVING_DTYPE": "bfloat16"},
    "continuous, bfloat16, unpacked": {
        "SERVING_BATCHING": "continuous",
        "SERVING_DTYPE": "bfloat16",
        "SERVING_PACKED": "false",
    },
    "continuous, bfloat16, model forward": {
        "SERVING_BATCHING": "continuous",
        "SERVING_DTYPE": "bfloat16",
        "SERVING_LEAN_STEP": "false",
    },
    "continuous, bfloat16": {"SERVING_BATCHING": "continuous", "SERVING_DTYPE": "bfloat16"},
}


def engine_table(args, tmp: Path, url: str, sessions, lm) -> None:
    """(e): every configuration on its own server, one after another, the same requests."""
    for i in (1, 2):
        write_lowrank_version(sessions, lm, f"lr{i}", seed=100 + i)
    common = {
        "SERVING_MAX_BATCH_SIZE": "32",  # the default wait (10 ms): idle TTFT includes it
        "SERVING_MAX_TOKENS": str(max(args.tokens, args.long_tokens)),
        "SERVING_MAX_PENDING": "256",
        "RATE_LIMIT_PER_MINUTE": "0",
        **_settings(args.set),
    }
    configs = {k: v for k, v in CONFIGS.items() if not args.configs or k in args.configs}
    with_vllm = VLLM_PYTHON.is_file() and args.device in ("auto", "cpu") and not args.configs
    rows = {label: measure_server(args, tmp, url, label, {**common, **settings})
            for label, settings in configs.items()}  # fmt: skip
    if with_vllm:  # started only now: idle, it still takes CPU from the other configurations
        with vllm_settings(args.model, tmp) as settings:
            label = "vLLM-CPU (through detox)"
            rows[label] = measure_server(args, tmp, url, label, {**common, **settings})
    print(f"\n(e) engine configurations: {args.model}, {args.tokens} new tokens per request "
          f"(long: {args.long_tokens}, short: {args.short_tokens}), greedy, best of "
          f"{args.repeat}" + "".join(f", DETOX_{kv}" for kv in args.set))  # fmt: skip
    print("| engine | 1 stream tok/s | 8 concurrent tok/s | 32 concurrent tok/s | 8 mixed tok/s "
          f"| mixed / base, median of {args.mixed_pairs} pairs [range] | short TTFT idle p50/p95 "
          "ms | short TTFT behind 8 long p50/p95 ms | loaded / idle p95 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        low, high = min(r["ratios"]), max(r["ratios"])
        print(f"| {label} | {r['one']:.1f} | {r['c8']:.1f} | {r['c32']:.1f} | {r['mixed']:.1f} | "
              f"{statistics.median(r['ratios']):.3f} [{low:.3f}, {high:.3f}] | "
              f"{r['idle'][0]:.0f} / {r['idle'][1]:.0f} | "
              f"{r['loaded'][0]:.0f} / {r['loaded'][1]:.0f} | "
              f"{r['loaded'][1] / r['idle'][1]:.1f}x |")  # fmt: skip


def _settings(pairs: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` options as settings (KEY without its DETOX_ prefix)."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE, not {pair!r}")
        settings[key.removeprefix("DETOX_").upper()] = value
    return settings


def measure_server(args, tmp: Path, url: str, label: str, settings: dict[str, str]) -> dict:
    """(e) for one configuration: its own `detox api`, measured, then stopped."""
    print(f"(e) {label}", file=sys.stderr)
    env = server_env(tmp / "e", url, args.model, args.device, **settings)
    port = free_port()
    log = tmp / f"api {label}.log"
    proc = start_server(env, port, log)
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=600, headers=bench_headers(),
        limits=httpx.Limits(keepalive_expiry=2),  # the server closes idle ones at 5 s
    )  # fmt: skip
    try:
        return measure_config(client, args)
    except httpx.HTTPError as exc:
        raise SystemExit(f"{label}: {exc!r}; the server's log: {log}") from exc
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)


def measure_config(client: httpx.Client, args) -> dict:
    for model in ("base", "lr1", "lr2"):
        stream_chat(client, model, 2)  # warm: every model loaded (or registered) first
    r = {"one": 0.0, "c8": 0.0, "c32": 0.0, "mixed": 0.0}
    mixed = [("base", "lr1", "lr2")[i % 3] for i in range(8)]
    for _ in range(args.repeat):
        _, seconds, used = stream_chat(client, "base", args.tokens)
        r["one"] = max(r["one"], used / seconds)
        r["c8"] = max(r["c8"], together(client, ["base"] * 8, args.tokens))
        r["c32"] = max(r["c32"], together(client, ["base"] * 32, args.tokens))
        r["mixed"] = max(r["mixed"], together(client, mixed, args.tokens))
    r["ratios"] = [
        together(client, mixed, args.tokens) / together(client, ["base"] * 8, args.tokens)
        for _ in range(args.mixed_pairs)
    ]
    idle = [_short_ttft(client, args) for _ in range(args.shorts)]
    loaded = _ttft_behind_long(client, args)
    r["idle"] = _p50_p95(idle)
    r["loaded"] = _p50_p95(loaded)
    return r


def _short_ttft(client: httpx.Client, args) -> float:
    return stream_chat(client, "base", args.short_tokens, prompt=SHORT_PROMPT)[0] * 1000


def _ttft_behind_long(client: httpx.Client, args) -> list[float]:
    """Short requests, one every `short_every_s`, while 8 long ones decode: their TTFTs in ms."""
    with ThreadPoolExecutor(8 + args.shorts) as pool:
        longs = [pool.submit(stream_chat, client, "base", args.long_tokens) for _ in range(8)]
        time.sleep(args.short_every_s)  # the long ones are decoding
        shorts = []
        for _ in range(args.shorts):
            shorts.append(pool.submit(_short_ttft, client, args))
            time.sleep(args.short_every_s)
        unfinished = sum(1 for f in longs if f.done())
        ttfts = [f.result() for f in shorts]
        for f in longs:
            f.result()
    if unfinished:
        print(f"   note: {unfinished} long request(s) had ended before the last short one "
              "was sent", file=sys.stderr)  # fmt: skip
    return ttfts


def _p50_p95(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


if __name__ == "__main__":
    main()
