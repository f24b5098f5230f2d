"""`detox corpora ...` against a live `detox api` (uvicorn subprocess, SQLite under a temporary
DETOX_HOME, Redis broker, DETOX_CORPUS_MAX_BYTES=4096), and the client's streamed upload."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.cli.client import UPLOAD_CHUNK, DetoxClient
from tests.api.conftest import closed_port
from tests.cli.servers import detox, running_api

MAX_BYTES = 4096
CORPUS = '"one"\n{"text": "two words", "harmful_spans": [[4, 9]], "id": 2}\n\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("home")
    with running_api(home, DETOX_CORPUS_MAX_BYTES=str(MAX_BYTES)) as url:
        yield url


def _file(tmp_path: Path, text: str | bytes, name: str = "corpus.jsonl") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _one_line_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    assert done.stdout == "" and done.stderr.strip().count("\n") == 0, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def test_upload_list_show_delete(server, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # tables fit on one line a row
    path = _file(tmp_path, CORPUS)
    uploaded = detox(server, "corpora", "upload", path, "--name", "cli-gender", "--json")
    assert uploaded.returncode == 0, uploaded.stderr
    corpus = json.loads(uploaded.stdout)
    assert (corpus["name"], corpus["documents"], corpus["annotated"]) == ("cli-gender", 2, 1)
    listed = json.loads(detox(server, "corpora", "list", "--json").stdout)
    assert corpus in listed["data"]
    for ref in ("cli-gender", corpus["id"]):
        shown = detox(server, "corpora", "show", ref, "--json")
        assert shown.returncode == 0 and json.loads(shown.stdout) == corpus
    table = detox(server, "corpora", "show", "cli-gender")
    assert (
        table.returncode == 0 and corpus["id"] in table.stdout and corpus["sha256"] in table.stdout
    )
    rows = detox(server, "corpora", "list")
    assert rows.returncode == 0 and corpus["id"] in rows.stdout and "cli-gender" in rows.stdout
    deleted = detox(server, "corpora", "delete", "cli-gender")
    assert deleted.returncode == 0 and "deleted corpus cli-gender" in deleted.stdout
    _one_line_error(detox(server, "corpora", "show", corpus["id"]), 2, "no corpus")
    _one_line_error(detox(server, "corpora", "delete", "cli-gender"), 2, "no corpus 'cli-gender'")


def test_upload_without_json_prints_one_summary_line(server, tmp_path):
    done = detox(server, "corpora", "upload", _file(tmp_path, CORPUS))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("uploaded corpus ") and "2 documents" in done.stdout
    assert "1 with harmful spans" in done.stdout


def test_input_errors_exit_2_with_one_line(server, tmp_path):
    bad_span = _file(tmp_path, '"ok"\n"ok"\n{"text": "abc", "harmful_spans": [[1, 7]]}\n')
    _one_line_error(
        detox(server, "corpora", "upload", bad_span), 2, "line 3", "harmful_spans[0] = [1, 7]"
    )
    not_utf8 = _file(tmp_path, b'"ok"\n"caf\xe9"\n', "latin1.jsonl")
    _one_line_error(detox(server, "corpora", "upload", not_utf8), 2, "line 2", "not UTF-8")
    big = _file(tmp_path, '"0123456789abcdef"\n' * 300, "big.jsonl")  # 6000 bytes > 4096
    _one_line_error(detox(server, "corpora", "upload", big), 2, "larger than", "4,096 bytes")
    empty = _file(tmp_path, "\n\n", "empty.jsonl")
    _one_line_error(detox(server, "corpora", "upload", empty), 2, "no document")
    missing = tmp_path / "missing.jsonl"
    _one_line_error(detox(server, "corpora", "upload", missing), 2, "no corpus file")
    good = _file(tmp_path, CORPUS, "good.jsonl")
    assert detox(server, "corpora", "upload", good, "--name", "twice").returncode == 0
    _one_line_error(
        detox(server, "corpora", "upload", good, "--name", "twice"), 2, "already exists"
    )
    _one_line_error(detox(server, "corpora", "upload", good, "--name", "base"), 2, "reserved")
    names = [
        c["name"] for c in json.loads(detox(server, "corpora", "list", "--json").stdout)["data"]
    ]
    assert names.count("twice") == 1 and "base" not in names


def test_unreachable_server_exits_1(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    _one_line_error(detox(url, "corpora", "list"), 1)
    _one_line_error(detox(url, "corpora", "upload", _file(tmp_path, CORPUS)), 1)


class StreamingTransport(httpx.BaseTransport):
    """Reads the request body chunk by chunk as a server would (MockTransport reads it whole)."""

    def __init__(self) -> None:
        self.chunks: list[int] = []
        self.request: httpx.Request | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.request = request
        self.chunks = [len(chunk) for chunk in request.stream]  # type: ignore[union-attr]
        body = {"id": "i", "name": "n", "documents": 1, "annotated": 0, "bytes": 1, "sha256": "s",
                "created_at": "t"}  # fmt: skip
        return httpx.Response(201, json=body)


def test_the_client_streams_the_file_in_chunks(tmp_path):
    path = _file(tmp_path, b'"x"\n' * (UPLOAD_CHUNK // 2 + 10))  # two chunks and a bit
    size = path.stat().st_size
    transport = StreamingTransport()
    with DetoxClient("http://detox", transport=transport) as api:
        assert api.upload_corpus(path, name="n")["id"] == "i"
    assert transport.request is not None
    headers = transport.request.headers
    assert headers["content-type"] == "application/x-ndjson"
    assert headers["content-length"] == str(size) and "transfer-encoding" not in headers
    assert dict(transport.request.url.params) == {"name": "n"}
    assert transport.chunks == [UPLOAD_CHUNK, UPLOAD_CHUNK, size - 2 * UPLOAD_CHUNK]
