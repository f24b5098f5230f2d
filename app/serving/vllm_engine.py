"""The vLLM engine: decoding in a vLLM OpenAI server, detox in front of it.

Detox keeps everything but the decoding: keys, limits, experiments, judging, metrics, the error
envelope, the live versions and the prompts (encoded here with the base model's tokenizer and
sent to vLLM as token ids, so both engines decode the same prompt). vLLM is never exposed.

- Every live version is registered in vLLM as a LoRA adapter, named as the version, from its
  exact PEFT export (`app.ml.export`) written under `adapter_dir`, a folder vLLM must be able to
  read (the same machine, or a shared volume). A version whose adapter would need a rank above
  the server's `max_lora_rank` is not registered: asking for it is a 409 that names the rank.
- Each refresh of the live versions (every `poll_s`, and as soon as a worker announces one)
  registers new versions, unloads retired ones, and, when vLLM has lost adapters it was given (it
  restarted), registers them again.
- vLLM unreachable: requests fail with `EngineUnavailableError` (503 `engine_unavailable`), and
  `health()` says why; jobs and versions do not depend on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from app.chains import chain_deltas
from app.ml.deltas import adapter_rank
from app.ml.errors import DetoxError
from app.ml.export import adapter_rank_problem, save_peft_adapter
from app.ml.models import LoadedModel
from app.serving.engine_base import EngineBase, EngineHealth, result_of
from app.serving.errors import (
    EngineUnavailableError,
    ModelLoadError,
    ServingError,
    UnknownModelError,
)
from app.serving.live_versions import BASE
from app.serving.sampling import Event, Failed, Finished, SamplingParams, TextDelta, TokenLogprob
from app.serving.source import VersionInfo, VersionSource
from app.serving.vllm_health import vllm_problem

log = logging.getLogger(__name__)
T = TypeVar("T")
_TOKEN_ID = "token_id:"  # how vLLM names a token with `return_tokens_as_token_ids`


class AdapterRankError(ModelLoadError):
    """A version's exact LoRA adapter needs a rank above the vLLM server's `max_lora_rank`."""


@dataclass(frozen=True)
class VllmTarget:
    """A resolved `model`: its public name and what vLLM serves it as."""

    name: str
    served: str


class VllmEngine(EngineBase):
    kind = "vllm"

    def __init__(
        self,
        lm: LoadedModel,
        source: VersionSource,
        *,
        url: str,
        adapter_dir: Path,
        max_lora_rank: int = 64,
        timeout_s: float = 300.0,
        **common: Any,
    ):
        self.url = url.rstrip("/")
        self.adapter_dir = Path(adapter_dir)
        self.max_lora_rank = max_lora_rank
        self.timeout_s = timeout_s
        self._compute_lock = threading.Lock()
        self._register_lock = threading.Lock()
        self._registered: dict[int, str] = {}  # version id -> adapter name, as vLLM holds them
        self._refused: dict[int, str] = {}  # version id -> why it cannot be an adapter
        self._base_name: str | None = None  # what vLLM serves the base model as
        super().__init__(lm, source, **common)
        try:
            self.refresh()
        except EngineUnavailableError as exc:  # detox starts anyway; a later refresh registers
            log.warning("%s", exc)

    # -- versions as adapters --------------------------------------------------------------

    def _on_refresh(self, live: dict[str, VersionInfo]) -> None:
        """Make vLLM's adapters the live versions: register new ones, unload retired ones, and
        register again what a restarted vLLM lost."""
        with self._register_lock:
            served = self._served_models()
            self._registered = {i: n for i, n in self._registered.items() if n in served}
            live_ids = {v.id for v in live.values()}
            for version_id in [i for i in self._registered if i not in live_ids]:
                self._unload(version_id)
            for info in live.values():
                if info.id not in self._registered and info.id not in self._refused:
                    try:
                        self._register(info)
                    except ModelLoadError as exc:
                        log.warning("version %r is not served by vLLM: %s", info.name, exc)

    def _served_models(self) -> set[str]:
        """The names vLLM serves now (its base model and adapters); learns the base's name."""
        models = self._request("GET", "/v1/models").json()["data"]
        base = [m["id"] for m in models if not m.get("parent")]
        if base:
            self._base_name = base[0]
        return {m["id"] for m in models}

    def _register(self, info: VersionInfo) -> str:
        """Export the version as an exact adapter and load it into vLLM (lock held)."""
        try:
            folder = self.compute(lambda: self._export(info))
        except AdapterRankError as exc:
            self._refused[info.id] = str(exc)
            raise
        response = self._request(
            "POST", "/v1/load_lora_adapter",
            json={"lora_name": info.name, "lora_path": str(folder)}, check=False,
        )  # fmt: skip
        if response.status_code >= 400 and "already been loaded" not in response.text:
            raise ModelLoadError(f"vLLM refused the adapter of {info.name!r}: {response.text}")
        self._registered[info.id] = info.name
        log.info("version %r registered in vLLM", info.name)
        return info.name

    def _export(self, info: VersionInfo) -> Path:
        chain = self.source.load_chain(info.id)
        if chain[-1].retired:
            raise UnknownModelError(f"version {info.name!r} is retired")
        deltas = chain_deltas(chain)
        problem = adapter_rank_problem(adapter_rank(deltas), self.max_lora_rank)
        if problem is not None:
            raise AdapterRankError(f"version {info.name!r} cannot be served by vLLM: {problem}")
        folder = self.adapter_dir / f"v{info.id}"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            save_peft_adapter(
                self.lm.model, deltas, folder,
                base_model_name_or_path=self._base_name or BASE, max_rank=self.max_lora_rank,
            )  # fmt: skip
        except DetoxError as exc:
            raise ModelLoadError(f"version {info.name!r} cannot be an adapter: {exc}") from exc
        return folder

    def _unload(self, version_id: int) -> None:
        name = self._registered.pop(version_id)
        self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name}, check=False)
        shutil.rmtree(self.adapter_dir / f"v{version_id}", ignore_errors=True)
        log.info("version %r unloaded from vLLM", name)

    def add_version(self, info: VersionInfo) -> str:
        """The version's adapter name in vLLM, registering it first if needed (blocking)."""
        if info.id in self._refused:
            raise AdapterRankError(self._refused[info.id])
        with self._register_lock:
            return self._registered.get(info.id) or self._register(info)

    def drop_version(self, version_id: int) -> None:
        with self._register_lock:
            if version_id in self._registered:
                self._unload(version_id)

    def target(self, model: str) -> VllmTarget:
        """Resolve `model`; a version not yet in vLLM is registered first (blocking)."""
        info = self.resolve(model)
        if info is None:
            return VllmTarget(BASE, self._base())
        return VllmTarget(info.name, self.add_version(info))

    def _base(self) -> str:
        if self._base_name is None:
            with self._register_lock:
                self._served_models()
        assert self._base_name is not None, "vLLM serves no base model"
        return self._base_name

    # -- generation ------------------------------------------------------------------------

    async def stream(
        self, prompt_ids: list[int], target: VllmTarget, params: SamplingParams
    ) -> AsyncIterator[Event]:
        """The request's events, streamed from vLLM; leaving early closes the stream, which
        vLLM takes as an abort."""
        with self._admitted(1):
            async for event in self._events(prompt_ids, target, params):
                if isinstance(event, Finished):
                    self.generated_tokens[target.name] += event.completion_tokens
                yield event

    async def complete_together(
        self, jobs: Sequence[tuple[list[int], VllmTarget, SamplingParams]]
    ) -> list[Finished]:
        """Sent at once; vLLM batches them with whatever else it is decoding."""
        with self._admitted(len(jobs)):
            results = await asyncio.gather(
                *(result_of(self._events(ids, target, params)) for ids, target, params in jobs)
            )
            for (_ids, target, _params), result in zip(jobs, results, strict=True):
                self.generated_tokens[target.name] += result.completion_tokens
            return list(results)

    async def _events(
        self, prompt_ids: list[int], target: VllmTarget, params: SamplingParams
    ) -> AsyncIterator[Event]:
        body = _completion_body(prompt_ids, target.served, params)
        text: list[str] = []
        logprobs: list[TokenLogprob] = []
        finish, usage = "length", {}
        try:
            async with (
                httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s) as client,
                client.stream("POST", "/v1/completions", json=body) as response,
            ):
                if response.status_code >= 400:
                    await response.aread()
                    raise self._refusal(response, target)
                async for chunk in _sse_chunks(response):
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", ()):
                        piece = choice.get("text") or ""
                        fresh = _logprobs(choice.get("logprobs"), params.logprobs)
                        logprobs += fresh
                        if piece or fresh:
                            text.append(piece)
                            yield TextDelta(piece, tuple(fresh))
                        finish = choice.get("finish_reason") or finish
        except httpx.TransportError as exc:
            self._registered.clear()  # it may come back empty: the next refresh re-registers
            yield Failed(self._unavailable(exc))
            return
        except ServingError as exc:
            yield Failed(exc)
            return
        yield Finished(
            text="".join(text),
            finish_reason="stop" if finish == "stop" else "length",
            prompt_tokens=usage.get("prompt_tokens", len(prompt_ids)),
            completion_tokens=usage.get("completion_tokens", len(logprobs)),
            finished_at=time.perf_counter(),
            logprobs=tuple(logprobs),
        )

    def _refusal(self, response: httpx.Response, target: VllmTarget) -> ServingError:
        if response.status_code == 404:  # an adapter vLLM lost (it restarted): next refresh
            self._registered = {i: n for i, n in self._registered.items() if n != target.served}
            return EngineUnavailableError(
                f"the vLLM engine does not hold {target.name!r} right now (it restarted?); "
                "it is registered again within a moment, retry shortly"
            )
        return ServingError(f"vLLM refused the request ({response.status_code}): {response.text}")

    # -- plumbing --------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, check: bool = True, **kwargs) -> httpx.Response:
        try:
            response = httpx.request(method, self.url + path, timeout=self.timeout_s, **kwargs)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from exc
        if check and response.status_code >= 400:
            raise ServingError(f"vLLM answered {response.status_code} to {path}: {response.text}")
        return response

    def _unavailable(self, exc: Exception) -> EngineUnavailableError:
        return EngineUnavailableError(
            f"the vLLM engine at {self.url} does not answer ({type(exc).__name__}); retry later"
        )

    def compute(self, fn: Callable[[], T]) -> T:
        """Torch work of this process (exports, the judge), one at a time, on the caller's
        thread: decoding is vLLM's, so nothing here competes with it."""
        with self._compute_lock:
            return fn()

    def health(self) -> EngineHealth:
        problem = vllm_problem(self.url)
        return EngineHealth(self.kind, problem is None, problem or f"vLLM at {self.url}")


def _completion_body(prompt_ids: list[int], model: str, params: SamplingParams) -> dict:
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
    if params.logprobs is not None:
        body["logprobs"] = params.logprobs
        body["return_tokens_as_token_ids"] = True
    return body


async def _sse_chunks(response: httpx.Response) -> AsyncIterator[dict]:
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ").strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _logprobs(block: dict | None, wanted: int | None) -> list[TokenLogprob]:
    """vLLM's completion logprobs (tokens named `token_id:N`) as detox's, `wanted` alternatives."""
    if not block or wanted is None:
        return []
    tops = block.get("top_logprobs") or [None] * len(block["tokens"])
    entries = []
    for token, logprob, top in zip(block["tokens"], block["token_logprobs"], tops, strict=True):
        ranked = sorted((top or {}).items(), key=lambda item: -item[1])[:wanted]
        entries.append(
            TokenLogprob(
                token=_token_id(token),
                logprob=float(logprob),
                top=tuple((_token_id(t), float(lp)) for t, lp in ranked),
            )
        )
    return entries


def _token_id(name: str) -> int:
    return int(name.removeprefix(_TOKEN_ID))
