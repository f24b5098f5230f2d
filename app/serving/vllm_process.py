"""A vLLM OpenAI server as a child process: what `detox up --engine vllm` starts (unless one
already answers at DETOX_VLLM_URL) and the vLLM tests run against. Torch-free.

vLLM lives in its own venv (`make vllm`: `.venv-vllm/`), because it pins its own transformers
and fastapi. The server serves the base model under the name detox gives it (`base`), takes
LoRA adapters at run time (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`), and runs eagerly (no graph
capture: on a CPU that costs minutes at start and buys little for a small model).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

from app.serving.vllm_health import vllm_problem

SERVED_BASE = "base"
_POLL_S = 1.0


class VllmStartError(RuntimeError):
    """The vLLM server did not come up; the message ends with its log's last lines."""


def vllm_command(
    python: Path,
    model: str,
    url: str,
    *,
    max_lora_rank: int,
    max_model_len: int | None = None,
    dtype: str = "auto",
) -> list[str]:
    address = urlparse(url)
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--served-model-name", SERVED_BASE,
        "--host", address.hostname or "127.0.0.1", "--port", str(address.port or 8001),
        "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", "4",
        "--dtype", dtype, "--enforce-eager",
    ]  # fmt: skip
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    return command


def start_vllm(
    python: Path,
    model: str,
    url: str,
    *,
    max_lora_rank: int,
    log_path: Path,
    max_model_len: int | None = None,
    kv_cache_gib: int = 1,
    dtype: str = "auto",
) -> subprocess.Popen:
    """Start the server (its output to `log_path`); `wait_until_healthy` waits for it.

    `dtype` "auto" is the model's own, except that vLLM's CPU backend turns float32 into bfloat16.
    """
    if not Path(python).is_file():
        raise VllmStartError(f"no vLLM at {python}: run `make vllm` first")
    env = os.environ | {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),  # GiB of KV cache on a CPU
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        command = vllm_command(
            python,
            model,
            url,
            max_lora_rank=max_lora_rank,
            max_model_len=max_model_len,
            dtype=dtype,
        )
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def wait_until_healthy(
    url: str, process: subprocess.Popen, *, timeout_s: float, log_path: Path
) -> None:
    """Return once the server answers /health; raise VllmStartError if it exits or is late."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise VllmStartError(f"vLLM exited with {process.returncode}:\n{_tail(log_path)}")
        if vllm_problem(url) is None:
            return
        time.sleep(_POLL_S)
    raise VllmStartError(f"vLLM did not answer at {url} in {timeout_s:.0f} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
