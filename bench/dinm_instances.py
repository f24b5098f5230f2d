"""Benchmark: one DINM edit from N SafeEdit instances (one joint edit, or edited in turn into one
delta): edit time, time per stage and peak memory against N, on the packaged cases
(app/ml/data/safeedit_cases.json).

Model load and evaluation are excluded. Each N runs in its own child process, so its peak memory
is its own and its first instance pays what a fresh worker pays (the null-space basis, the retain
recordings); `warm s/instance` is the mean over the instances after the first (sequential presets
only).

    .venv/bin/python bench/dinm_instances.py                  # N = 1, 4, 16, all; default preset
    .venv/bin/python bench/dinm_instances.py --n 1 --n 4 --preset paper
    .venv/bin/python bench/dinm_instances.py --processes      # first vs second process, N = 1
    .venv/bin/python bench/dinm_instances.py --processes --params '{"steps":1,"instance_steps":0}'

`--processes` empties the disk cache of derived values first (`~/.cache/detox/derived`), then
runs the same one-instance edit in two fresh processes one after the other: the first builds what
it needs (and keeps what can be kept on disk), the second starts from the disk cache as a
restarted worker or a second `detox dinm` would. `--params` overrides fields of the preset: with
one step, the edit time is mostly what a process builds or reads from the cache ("prepare").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "app" / "ml" / "data" / "safeedit_cases.json"


def child(n: int, preset: str | None, overrides: str) -> None:
    import transformers

    from app.ml.dinm import dinm_edit_many
    from app.ml.dinm_params import DinmParams
    from app.ml.memory import peak_mb, reset_peak
    from app.ml.models import load_model
    from app.ml.safeedit import load_instances

    transformers.utils.logging.set_verbosity_error()
    lm = load_model("demo")
    cases = load_instances(CASES)
    instances = cases[:n] if n > 0 else cases
    params = DinmParams.parse(({"preset": preset} if preset else {}) | json.loads(overrides))
    times: list[float] = []
    last = [time.perf_counter()]
    stages: dict[str, float] = {}
    current = ["", time.perf_counter()]

    def progress(stage: str, fraction: float) -> None:
        now = time.perf_counter()
        if stage != current[0]:
            if current[0]:
                stages[current[0]] = stages.get(current[0], 0.0) + now - current[1]
            current[:] = [stage, now]
        # A sequential edit reports "tune" in N equal shares; a share's end is an instance's end.
        if stage == "tune" and fraction * len(instances) >= len(times) + 1 - 1e-9:
            times.append(now - last[0])
            last[0] = now

    reset_peak(lm.device)
    result = dinm_edit_many(lm, instances, params, progress=progress)
    stages[current[0]] = stages.get(current[0], 0.0) + time.perf_counter() - current[1]
    joint = params.joint  # one objective over every instance: no per-instance times
    warm = times[1:]
    print(json.dumps({
        "n": len(instances), "edit_s": result.edit_seconds,
        "first_s": None if joint else times[0],
        "warm_s": sum(warm) / len(warm) if warm and not joint else None,
        "peak_mb": peak_mb(lm.device), "layers": result.layers,
        "params": len(result.delta.params), "stages": stages,
    }))  # fmt: skip


def _run_child(n: int, preset: str | None, overrides: str) -> dict:
    command = [sys.executable, __file__, "--child", str(n), "--params", overrides]
    if preset:
        command += ["--preset", preset]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def processes(preset: str | None, overrides: str) -> None:
    import shutil

    from app.ml.demo import default_cache_dir

    cache = default_cache_dir()  # where the children's load_model("demo") keeps derived values
    shutil.rmtree(Path(cache) / "derived", ignore_errors=True)
    print(f"one-instance edit, preset {preset or 'default'}, params {overrides}, disk cache "
          f"{cache}/derived emptied")  # fmt: skip
    for name in ("first process", "second process"):
        row = _run_child(1, preset, overrides)
        print(f"{name}: edit {row['edit_s']:.1f} s, peak {row['peak_mb']:.0f} MB, "
              f"stages {_stages(row)}")  # fmt: skip


def _stages(row: dict) -> str:
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in row["stages"].items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append", help="instances (0: all); repeatable")
    parser.add_argument("--preset", default=None, help="DINM preset (default: the default one)")
    parser.add_argument("--processes", action="store_true", help="first vs second process")
    parser.add_argument("--params", default="{}", help="JSON: DINM params over the preset's")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.preset, args.params)
    if args.processes:
        return processes(args.preset, args.params)
    print(f"DINM from N instances, demo model, preset {args.preset or 'default'}, params "
          f"{args.params}")  # fmt: skip
    header = f"{'N':>3} {'edit s':>8} {'first s':>8} {'warm s/inst':>11} {'peak MB':>8}"
    print(f"{header}  layers; stages")
    for n in args.n or [1, 4, 16, 0]:
        row = _run_child(n, args.preset, args.params)
        first = "-" if row["first_s"] is None else f"{row['first_s']:.1f}"
        warm = "-" if row["warm_s"] is None else f"{row['warm_s']:.2f}"
        layers = row["layers"] if len(row["layers"]) <= 3 else f"{len(row['layers'])} layers"
        print(f"{row['n']:>3} {row['edit_s']:>8.1f} {first:>8} {warm:>11} "
              f"{row['peak_mb']:>8.0f}  {layers}; {_stages(row)}")  # fmt: skip


if __name__ == "__main__":
    main()
