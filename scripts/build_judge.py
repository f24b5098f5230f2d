"""Rebuild the offline/2 judge's refusal model, app/ml/data/refusal_model.json, from XSTest.

    .venv/bin/python scripts/build_judge.py                      # ../shared/data/xstest
    .venv/bin/python scripts/build_judge.py DATA_DIR --out FILE  # elsewhere; --check compares

DATA_DIR holds XSTest's `labelled_<model>.csv` files (human-labelled completions, CC BY 4.0);
the default is `../shared/data/xstest` relative to the repository root. The same files give the
same output byte for byte (see app/ml/refusal_training.py); `--check` exits 1 if the shipped
file differs from what the data give.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.ml.refusal import MODEL_PATH
from app.ml.refusal_training import build

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "xstest"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="XSTest folder")
    parser.add_argument("--out", type=Path, default=MODEL_PATH, help="where to write the model")
    parser.add_argument("--check", action="store_true", help="only compare with --out")
    args = parser.parse_args(argv)
    text = build(args.data)
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'identical to' if same else 'DIFFERS from'} a build from {args.data}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode())} bytes) from {args.data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
