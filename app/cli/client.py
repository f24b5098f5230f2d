"""A small client of the detox HTTP API (httpx): one method per endpoint, JSON in and out.

Errors: `ApiError` carries the server's envelope (status, message, type, param, code);
`Unreachable` means no answer at all (server down, wrong DETOX_URL).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx

from app.settings import Settings

TIMEOUT = httpx.Timeout(30.0, connect=5.0)
STREAM_TIMEOUT = httpx.Timeout(60.0, connect=5.0)  # the server sends a keepalive every 15 s
UPLOAD_TIMEOUT = httpx.Timeout(300.0, connect=5.0)  # a corpus is validated as it is sent
UPLOAD_CHUNK = 256 * 1024
EXPORT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)  # the server builds an export before sending


class ClientError(Exception):
    """Base of the client's errors."""


class Unreachable(ClientError):
    """The server did not answer."""


class ApiError(ClientError):
    """The server answered with an error envelope."""

    def __init__(
        self, status: int, message: str, type: str | None, param: str | None, code: str | None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    @property
    def is_input_error(self) -> bool:
        """4xx: the request was wrong (retrying it unchanged cannot help)."""
        return 400 <= self.status < 500


class DetoxClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=TIMEOUT, transport=transport
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> DetoxClient:
        return cls(settings.url, api_key=settings.api_key)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DetoxClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # jobs
    def submit_job(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=body, headers=headers)

    def get_job(self, job_id: str) -> Any:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def list_jobs(
        self, *, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Any:
        params = {"status": status, "limit": limit, "cursor": cursor}
        return self._request("GET", "/v1/jobs", params={k: v for k, v in params.items() if v})

    def cancel_job(self, job_id: str) -> Any:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def job_events(self, job_id: str) -> Iterator[tuple[str, Any]]:
        """(event, data) pairs from the job's event stream, until the server ends it."""
        try:
            with self._http.stream(
                "GET", f"/v1/jobs/{job_id}/events", timeout=STREAM_TIMEOUT
            ) as response:
                if response.is_error:
                    response.read()
                    raise _api_error(response)
                yield from _parse_sse(response.iter_lines())
        except httpx.TransportError as exc:
            raise Unreachable(f"{self.base_url}: {exc or type(exc).__name__}") from exc

    # versions
    def list_versions(self, *, include_retired: bool = False) -> Any:
        params = {"include_retired": "true"} if include_retired else {}
        return self._request("GET", "/v1/versions", params=params)

    def get_version(self, name: str) -> Any:
        return self._request("GET", f"/v1/versions/{name}")

    def retire_version(self, name: str, *, cascade: bool = False) -> Any:
        params = {"cascade": "true"} if cascade else {}
        return self._request("DELETE", f"/v1/versions/{name}", params=params)

    def export_version(
        self,
        name: str,
        *,
        fmt: str,
        dest: IO[bytes],
        max_rel_error: float | None = None,
        max_rank: int | None = None,
    ) -> dict[str, str]:
        """Stream the version's export into `dest` (a tar for peft and merged, the safetensors
        delta for delta); returns the response's headers."""
        params = {"format": fmt, "max_rel_error": max_rel_error, "max_rank": max_rank}
        try:
            with self._http.stream(
                "GET", f"/v1/versions/{name}/export", timeout=EXPORT_TIMEOUT,
                params={k: v for k, v in params.items() if v is not None},
            ) as response:  # fmt: skip
                if response.is_error:
                    response.read()
                    raise _api_error(response)
                for chunk in response.iter_bytes():
                    dest.write(chunk)
                return dict(response.headers)
        except httpx.TransportError as exc:
            raise Unreachable(f"{self.base_url}: {exc or type(exc).__name__}") from exc

    # corpora
    def upload_corpus(self, path: Path, *, name: str | None = None) -> Any:
        """Stream a JSON Lines file to the server (never read whole into memory)."""

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as handle:
                while chunk := handle.read(UPLOAD_CHUNK):
                    yield chunk

        headers = {
            "Content-Type": "application/x-ndjson",
            "Content-Length": str(path.stat().st_size),  # lets the server refuse a large file early
        }
        params = {"name": name} if name is not None else {}
        return self._request(
            "POST", "/v1/corpora", params=params, content=chunks(), headers=headers,
            timeout=UPLOAD_TIMEOUT,
        )  # fmt: skip

    def list_corpora(self, *, limit: int | None = None) -> Any:
        params = {"limit": limit} if limit is not None else {}
        return self._request("GET", "/v1/corpora", params=params)

    def get_corpus(self, id_or_name: str) -> Any:
        return self._request("GET", f"/v1/corpora/{quote(id_or_name, safe='')}")

    def delete_corpus(self, id_or_name: str) -> None:
        self._request("DELETE", f"/v1/corpora/{quote(id_or_name, safe='')}")

    # keys (admin)
    def create_key(self, name: str, role: str) -> Any:
        return self._request("POST", "/v1/keys", json={"name": name, "role": role})

    def list_keys(self, *, include_revoked: bool = False) -> Any:
        params = {"include_revoked": "true"} if include_revoked else {}
        return self._request("GET", "/v1/keys", params=params)

    def revoke_key(self, key_id: int) -> Any:
        return self._request("DELETE", f"/v1/keys/{key_id}")

    # experiments
    def create_experiment(self, body: dict[str, Any]) -> Any:
        return self._request("POST", "/v1/experiments", json=body)

    def list_experiments(self, *, status: str | None = None) -> Any:
        params = {"status": status} if status is not None else {}
        return self._request("GET", "/v1/experiments", params=params)

    def get_experiment(self, name: str) -> Any:
        return self._request("GET", f"/v1/experiments/{quote(name, safe='')}")

    def experiment_results(self, name: str) -> Any:
        return self._request("GET", f"/v1/experiments/{quote(name, safe='')}/results")

    def stop_experiment(self, name: str, *, winner: str | None = None) -> Any:
        body = {"winner": winner} if winner is not None else {}
        return self._request("POST", f"/v1/experiments/{quote(name, safe='')}/stop", json=body)

    def experiment_feedback(self, name: str, response_id: str, score: float) -> Any:
        body = {"response_id": response_id, "score": score}
        return self._request("POST", f"/v1/experiments/{quote(name, safe='')}/feedback", json=body)

    # generation
    def list_models(self) -> Any:
        return self._request("GET", "/v1/models")

    def chat(self, body: dict[str, Any]) -> Any:
        """One chat completion (`body` as OpenAI's, without `stream`)."""
        return self._request("POST", "/v1/chat/completions", json=body, timeout=STREAM_TIMEOUT)

    def chat_stream(self, body: dict[str, Any]) -> Iterator[str]:
        """The answer's text pieces as the server streams them."""
        try:
            with self._http.stream(
                "POST", "/v1/chat/completions", json=body | {"stream": True}, timeout=STREAM_TIMEOUT
            ) as response:
                if response.is_error:
                    response.read()
                    raise _api_error(response)
                for chunk in _openai_chunks(response.iter_lines()):
                    if "error" in chunk:
                        error = chunk["error"]
                        raise ApiError(500, str(error.get("message")), error.get("type"),
                                       error.get("param"), error.get("code"))  # fmt: skip
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
        except httpx.TransportError as exc:
            raise Unreachable(f"{self.base_url}: {exc or type(exc).__name__}") from exc

    def ab(self, body: dict[str, Any]) -> Any:
        """The same prompt through every arm: `{"arms": [{model, text, unsafe_score, ...}]}`."""
        return self._request("POST", "/v1/ab", json=body, timeout=STREAM_TIMEOUT)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"{self.base_url}: {exc or type(exc).__name__}") from exc
        if response.is_error:
            raise _api_error(response)
        return response.json() if response.content else None  # 204: no body


def _api_error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(
            response.status_code,
            str(error.get("message")),
            error.get("type"),
            error.get("param"),
            error.get("code"),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
        message = f"HTTP {response.status_code}" + (f": {text}" if text else "")
        return ApiError(response.status_code, message, None, None, None)


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue  # comment (keepalive)
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
    if data:
        yield event, json.loads("\n".join(data))


def _openai_chunks(lines: Iterator[str]) -> Iterator[Any]:
    """The JSON payloads of an OpenAI-style stream, until `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
