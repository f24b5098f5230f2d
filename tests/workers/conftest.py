"""Real services for the worker tests: worker SUBPROCESSES (`python -m workers`) on a tiny model
saved to disk, with either PostgreSQL + Redis (database 5, flushed) or the embedded default
(SQLite + the filesystem broker under a temporary DETOX_HOME). Every process a test starts is
killed when the test (or module) ends, whatever happened."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import torch
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings
from app.store import make_engine, make_sessionmaker, migrate
from tests.services import redis_url
from workers.celery_app import create_app

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = redis_url(5)
HEARTBEAT_TIMEOUT_S = 3.0
MODES = ["embedded", "postgres-redis"]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """In-process edits on one thread (this machine has two cores, shared with the workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _flush_redis() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); run scripts/services.sh")
    finally:
        client.close()


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while "celery.apps.worker" not in self.output() or " ready." not in self.output():
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited ({self.process.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready after {timeout} s:\n{self.tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no ack, no cleanup, as if the machine died."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


@dataclass
class Service:
    """A database + broker pair, and how to start workers on it."""

    mode: str
    settings: Settings
    sessions: sessionmaker[Session]
    app: Celery
    model_dir: Path
    workdir: Path
    workers: list[Worker] = field(default_factory=list)

    def start_worker(self, **env: str) -> Worker:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("DETOX_")}
        environ.update(
            DETOX_HOME=str(self.settings.home),
            DETOX_DATABASE_URL=self.settings.resolved_database_url(),
            DETOX_MODEL=str(self.model_dir),
            DETOX_DEVICE="cpu",
            DETOX_CACHE_DIR=str(self.workdir / "cache"),
            DETOX_TORCH_THREADS="1",
            DETOX_MAX_NEW_TOKENS="4",
            DETOX_JOB_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S),
            **env,
        )
        if self.settings.broker_url is not None:
            environ["DETOX_BROKER_URL"] = self.settings.broker_url
        log = self.workdir / f"worker-{len(self.workers)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "workers"],
                cwd=self.workdir,  # anything written relative to the cwd lands here
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        worker = Worker(process, log)
        self.workers.append(worker)
        return worker

    def kill_all(self) -> None:
        for worker in self.workers:
            worker.kill()


@pytest.fixture(scope="module")
def make_service(
    tmp_path_factory: pytest.TempPathFactory,
    new_database: Callable[[str], str],
    tiny_model_dir: Path,
) -> Iterator[Callable[[str], Service]]:
    """make_service(mode) -> a fresh database and broker; its workers die with the module."""
    services: list[Service] = []

    def make(mode: str) -> Service:
        home = tmp_path_factory.mktemp("detox-home")
        if mode == "embedded":
            settings = Settings(home=home)
        else:
            _flush_redis()
            settings = Settings(
                home=home, database_url=new_database("postgresql"), broker_url=REDIS_URL
            )
        url = settings.resolved_database_url()
        migrate.upgrade(url)
        service = Service(
            mode,
            settings,
            make_sessionmaker(make_engine(url)),
            create_app(settings),
            tiny_model_dir,
            home,
        )
        services.append(service)
        return service

    try:
        yield make
    finally:
        for service in services:
            service.kill_all()
        if any(s.mode != "embedded" for s in services):
            _flush_redis()
