"""Whether a vLLM server answers, without torch (the API's /readyz asks before any model loads)."""

from __future__ import annotations

import httpx

HEALTH_TIMEOUT_S = 2.0


def vllm_problem(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> str | None:
    """None when the vLLM server at `url` says it is healthy, else why not."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s)
    except httpx.TransportError as exc:
        return f"vLLM at {url} does not answer ({type(exc).__name__})"
    if response.status_code != 200:
        return f"vLLM at {url} answers /health with {response.status_code}"
    return None
