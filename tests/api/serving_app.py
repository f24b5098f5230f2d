"""An API app whose engine serves a tiny model, on its own SQLite store (no Redis needed)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from app.api.main import create_app
from app.ml.judges import Verdict
from app.ml.models import LoadedModel, load_model
from app.serving.engine import Engine
from app.serving.factory import build_engine
from app.settings import Settings
from app.store import migrate
from app.store.db import make_engine, make_sessionmaker
from tests.factories import tiny_model
from tests.serving.conftest import random_delta, store_version

torch.set_num_threads(1)


class LengthJudge:
    """A stand-in judge: the score is the share of the text that is the letter 'a'."""

    name = "test-length"

    def judge(self, prompts: list[str], responses: list[str], *, harmful: bool = True):
        return [
            Verdict(unsafe=False, score=r.count("a") / max(1, len(r)), refused=False)
            for r in responses
        ]


@dataclass
class ServingStore:
    settings: Settings
    sessions: sessionmaker[Session]


@contextmanager
def serving_store(tmp_path: Path, **settings: Any) -> Iterator[ServingStore]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    base = {
        "home": tmp_path / "home",
        "database_url": url,
        "broker_url": "memory://",
        "device": "cpu",
        "serving_poll_s": 0.1,
        "serving_max_wait_ms": 50,
    }
    try:
        yield ServingStore(Settings(**(base | settings)), make_sessionmaker(engine))
    finally:
        engine.dispose()


def tiny_app(store: ServingStore, lm: LoadedModel, judge_loader: Any = LengthJudge) -> FastAPI:
    """The app, its engine built around `lm` (the store's versions, the stand-in judge unless
    another is given)."""
    settings = store.settings

    def factory(sessions: Any) -> Engine:
        return build_engine(settings, sessions, lm=lm, judge_loader=judge_loader)

    return create_app(settings, engine_factory=factory)


def sse_events(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, `[DONE]` kept as the string."""
    import json

    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(tmp_path: Path, **overrides: Any) -> Iterator[tuple[str, FastAPI]]:
    """A real server (uvicorn, loopback) with the default engine, which loads the model the
    settings name: a tiny GPT-2 saved to a folder, as DETOX_MODEL would point to. The store holds
    one version, `safe1`. Yields the server's root URL and the app."""
    folder = tmp_path / "tiny-model"
    made = tiny_model("gpt2")
    made.model.save_pretrained(folder)
    made.tokenizer.save_pretrained(folder)
    settings = {"model": str(folder), "serving_max_tokens": 12, "judge": "offline"} | overrides
    with serving_store(tmp_path, **settings) as store:
        lm = load_model(str(folder), device="cpu")
        store_version(store.sessions, lm, random_delta(lm, layer=1, seed=1), name="safe1")
        port = free_port()
        app = create_app(store.settings)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}", app
        finally:
            server.should_exit = True
            thread.join(20)
