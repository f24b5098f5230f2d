"""`detox up`'s worker: a child process that is restarted when it dies and never outlives `up`.

The parent side, `WorkerSupervisor`: one thread starts the worker, waits for it and, when it
dies on its own, starts a new one after a backoff (doubling from `backoff_s` up to
`backoff_max_s`, back to `backoff_s` once a worker has lived `stable_s`). The API keeps serving
meanwhile; `check()` is the `worker` entry of `/readyz`. A job the dead worker was running keeps
a `running` row with an ageing heartbeat: the next worker's stale-job reaper requeues it.

The child side, `exit_with_parent`: on Linux the kernel sends the worker SIGTERM when `up` dies
(PR_SET_PDEATHSIG, even when `up` is SIGKILLed), but a busy Celery worker answers SIGTERM with a
warm shutdown that waits for the job. So the worker also watches its parent's pid and, once the
parent is gone, exits at once (`os._exit`); the job is requeued as for any dead worker.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from app.api.schemas import CheckResult

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl(2)
PARENT_PID_ENV = "DETOX_PARENT_PID"  # set by `up` for its worker: the pid to outlive not
PARENT_WATCH_S = 0.5
ORPHAN_EXIT_CODE = 70


class WorkerSupervisor:
    """Runs `command` as the worker; `start()` it once, `stop()` it once."""

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        *,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        stable_s: float = 60.0,
        stop_timeout_s: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._command = list(command)
        self._env = {**env, PARENT_PID_ENV: str(os.getpid())}
        self._backoff_s, self._backoff_max_s, self._stable_s = backoff_s, backoff_max_s, stable_s
        self._stop_timeout_s = stop_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._missing: str | None = None  # why no worker runs now (None: one runs)
        self.restarts = 0
        self._started = threading.Event()
        self._thread = threading.Thread(
            target=self._supervise, name="worker-supervisor", daemon=True
        )

    @property
    def pid(self) -> int | None:
        with self._lock:
            return None if self._proc is None else self._proc.pid

    def start(self) -> int:
        """Start the first worker (in the supervising thread, see `_spawn`); returns its pid."""
        self._thread.start()
        self._started.wait()
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"the worker could not be started: {self._missing}")
        return pid

    def check(self) -> CheckResult:
        """The `/readyz` entry: ok while a worker process runs."""
        with self._lock:
            proc, missing = self._proc, self._missing
        if proc is not None and missing is None:
            return CheckResult(ok=True, detail=f"running (pid {proc.pid})")
        return CheckResult(ok=False, detail=missing or "not started")

    def stop(self) -> int | None:
        """Stop supervising and the worker (SIGTERM, then SIGKILL after the timeout)."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        code = None if proc is None else stop_process(proc, timeout=self._stop_timeout_s)
        if self._thread.is_alive():
            self._thread.join(timeout=self._stop_timeout_s + 5)
        return code

    def _spawn(self) -> None:
        # Called only in the supervising thread: PR_SET_PDEATHSIG fires when the THREAD that
        # forked the child ends, and this thread lives until the worker is stopped.
        with self._lock:
            if self._stopping.is_set():
                return
            self._proc = subprocess.Popen(
                self._command,
                env=self._env,
                start_new_session=True,  # Ctrl-C reaches `up` only; it stops the worker
                preexec_fn=_die_with_parent,
            )
            self._missing = None
        log.info("worker started (pid %d)", self._proc.pid)

    def _supervise(self) -> None:
        delay = self._backoff_s
        try:
            self._spawn()
        except OSError as exc:
            self._missing = f"could not start: {exc}"
        finally:
            self._started.set()
        while self._proc is not None and not self._stopping.is_set():
            born = self._clock()
            code = self._proc.wait()
            if self._stopping.is_set():
                return
            if self._clock() - born >= self._stable_s:
                delay = self._backoff_s  # it ran a good while: this is no crash loop
            with self._lock:
                self._missing = f"worker exited (status {code}); restarting in {delay:g} s"
            log.warning(
                "the worker (pid %d) exited with status %s; restarting it in %g s",
                self._proc.pid, code, delay,
            )  # fmt: skip
            if self._stopping.wait(delay):
                return
            try:
                self._spawn()
            except OSError as exc:
                with self._lock:
                    self._missing = f"worker could not be restarted: {exc}"
                log.error("the worker could not be restarted: %s", exc)
                return
            self.restarts += 1
            delay = min(delay * 2, self._backoff_max_s)


def stop_process(proc: subprocess.Popen, *, timeout: float) -> int:
    """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("the worker did not stop in %g s; killing it", timeout)
            proc.kill()
    return proc.wait()


def _die_with_parent() -> None:
    """In the worker, before exec: on Linux, get SIGTERM when the parent dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def exit_with_parent(environ: Mapping[str, str] = os.environ) -> threading.Thread | None:
    """In a worker started by `up` (PARENT_PID_ENV set): a daemon thread that ends this process
    at once when its parent is gone (reparented: the pid differs). None when not supervised."""
    value = environ.get(PARENT_PID_ENV)
    if not value:
        return None
    parent = int(value)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_WATCH_S)
        log.warning("the parent process (pid %d) is gone; the worker exits now", parent)
        os._exit(ORPHAN_EXIT_CODE)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
