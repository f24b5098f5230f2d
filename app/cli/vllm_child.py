"""`detox up --engine vllm`: a vLLM server as a child of `up`, unless one already answers at
DETOX_VLLM_URL (then that one is used and left alone)."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass

import typer

from app.cli.output import console
from app.serving.vllm_health import vllm_problem
from app.serving.vllm_process import VllmStartError, start_vllm, wait_until_healthy
from app.settings import Settings

START_TIMEOUT_S = 900.0  # a first start on a small CPU: imports, weights, KV cache
STOP_TIMEOUT_S = 20.0


@dataclass
class VllmChild:
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the engine core too
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_vllm_child(settings: Settings) -> VllmChild | None:
    """The started server, or None when one already answers at the URL. Exit 2 when it cannot
    start (no `make vllm`, a model vLLM cannot load), with the reason."""
    url = settings.vllm_url
    if vllm_problem(url) is None:
        console.print(f"using the vLLM server already answering at {url}", highlight=False)
        return None
    log_path = settings.home_dir() / "logs" / "vllm.log"
    console.print(f"starting vLLM at {url} (log: {log_path}) ...", highlight=False)
    try:
        process = start_vllm(
            settings.vllm_python, _vllm_model(settings), url,
            max_lora_rank=settings.vllm_max_lora_rank, log_path=log_path,
        )  # fmt: skip
        try:
            wait_until_healthy(url, process, timeout_s=START_TIMEOUT_S, log_path=log_path)
        except BaseException:
            VllmChild(process).stop()
            raise
    except VllmStartError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"vLLM is up at {url}", highlight=False)
    return VllmChild(process)


def _vllm_model(settings: Settings) -> str:
    """What vLLM loads: the demo model's converted folder, a model folder, or a hub id."""
    if settings.model == "demo":
        from app.ml.demo import demo_model_dir

        return str(demo_model_dir(settings.cache_dir))
    if settings.model.endswith(".gguf"):
        raise VllmStartError("the vLLM engine takes a model folder or a hub id, not a .gguf file")
    return settings.model
