"""Rebuild the offline judges' refusal models (app/ml/data/refusal_model*.json) from XSTest.

    .venv/bin/python scripts/build_judge.py                 # every version, ../shared/data/xstest
    .venv/bin/python scripts/build_judge.py DATA_DIR --judge offline/3 --out FILE
    .venv/bin/python scripts/build_judge.py --check         # compare instead of writing

DATA_DIR holds XSTest's `labelled_<model>.csv` files (human-labelled completions, CC BY 4.0);
the default is `../shared/data/xstest` relative to the repository root. Each judge version
(offline/2, offline/3) has its own features and file. The same files give the same output byte
for byte (see app/ml/refusal_training.py); `--check` exits 1 if a shipped file differs from what
the data give.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.ml.refusal import MODEL_PATHS
from app.ml.refusal_training import build

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "xstest"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="XSTest folder")
    parser.add_argument(
        "--judge", choices=sorted(MODEL_PATHS), help="one version only (default: every one)"
    )
    parser.add_argument("--out", type=Path, help="where to write the model (needs --judge)")
    parser.add_argument("--check", action="store_true", help="only compare with the file")
    args = parser.parse_args(argv)
    if args.out and not args.judge:
        parser.error("--out needs --judge: each version has its own file")
    judges = [args.judge] if args.judge else sorted(MODEL_PATHS)
    failed = 0
    for judge in judges:
        out = args.out or MODEL_PATHS[judge]
        text = build(args.data, judge)
        if args.check:
            same = out.exists() and out.read_text(encoding="utf-8") == text
            print(
                f"{judge}: {out}: {'identical to' if same else 'DIFFERS from'} a build from "
                f"{args.data}"
            )
            failed += not same
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"{judge}: wrote {out} ({len(text.encode())} bytes) from {args.data}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
