"""Benchmark: job overhead = time from POST /v1/jobs to `succeeded` minus the worker's own time.

Starts `detox api` and `detox worker` as real processes in each mode, waits until the worker has
loaded the demo model (a warm-up job), then submits DINM jobs one after another and follows each
through its server-sent events. The worker's own time is the job's finished_at - started_at.

    .venv/bin/python bench/job_overhead.py [--jobs 5] [--modes embedded,postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

from harness import BENCH_KEY, free_port

from app.cli.client import DetoxClient

ROOT = Path(__file__).resolve().parents[1]
DETOX = [sys.executable, "-m", "app.cli"]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def _instance() -> dict:
    return json.loads((ROOT / "examples" / "safeedit_example.json").read_text())[0]


def _wait_ready(client: DetoxClient, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client._http.get("/readyz").raise_for_status()
            return
        except Exception:
            time.sleep(0.5)
    raise SystemExit("the API did not become ready")


def _run_job(client: DetoxClient, body: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    job = client.submit_job(body)
    for event, data in client.job_events(job["id"]):
        if event == "done":
            job = data
            break
    total = time.perf_counter() - start
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job['id']} ended {job['status']}: {job['error']}")
    return total, job


def _seconds(job: dict, start: str, end: str) -> float:
    return (datetime.fromisoformat(job[end]) - datetime.fromisoformat(job[start])).total_seconds()


def measure(mode: str, env: dict, jobs: int) -> dict:
    port = free_port()
    env = {
        **os.environ,
        **env,
        "DETOX_URL": f"http://127.0.0.1:{port}",
        "DETOX_MAX_NEW_TOKENS": "16",
        "DETOX_ADMIN_KEY": BENCH_KEY,
    }
    api = subprocess.Popen(
        [*DETOX, "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = subprocess.Popen(
        [*DETOX, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with DetoxClient(env["DETOX_URL"], api_key=BENCH_KEY) as client:
            _wait_ready(client)
            body = {
                "kind": "dinm",
                "parent": "base",
                "instance": _instance(),
                "params": {"steps": 2},
            }
            _run_job(client, body)  # warm-up: the worker loads the model on its first job
            rows = []
            for _ in range(jobs):
                total, job = _run_job(client, body)
                own = _seconds(job, "started_at", "finished_at")
                rows.append((total, own, total - own, _seconds(job, "created_at", "started_at")))
    finally:
        for proc in (api, worker):
            proc.terminate()
        for proc in (api, worker):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {
        "mode": mode,
        "total": statistics.median(r[0] for r in rows),
        "worker": statistics.median(r[1] for r in rows),
        "overhead": statistics.median(r[2] for r in rows),
        "overhead_max": max(r[2] for r in rows),
        "queue_wait": statistics.median(r[3] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--modes", default="embedded,postgres")
    args = parser.parse_args()
    results = []
    for mode in args.modes.split(","):
        if mode == "embedded":
            with tempfile.TemporaryDirectory() as home:
                results.append(measure(mode, {"DETOX_HOME": home}, args.jobs))
        elif mode == "postgres":
            import psycopg

            db = f"detox_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{db}"')
            try:
                with tempfile.TemporaryDirectory() as home:
                    env = {
                        "DETOX_HOME": home,
                        "DETOX_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}",
                        "DETOX_BROKER_URL": "redis://127.0.0.1:6379/9",
                    }
                    results.append(measure(mode, env, args.jobs))
            finally:
                with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    print(f"DINM jobs on the demo model (2 steps, 16 eval tokens), median of {args.jobs}, seconds")
    print(f"{'mode':<10}{'POST->done':>12}{'worker':>10}{'overhead':>10}{'max':>8}{'queued':>9}")
    for r in results:
        print(
            f"{r['mode']:<10}{r['total']:>12.2f}{r['worker']:>10.2f}{r['overhead']:>10.2f}"
            f"{r['overhead_max']:>8.2f}{r['queue_wait']:>9.2f}"
        )
    print("target: overhead <= 1.5 s")


if __name__ == "__main__":
    main()
