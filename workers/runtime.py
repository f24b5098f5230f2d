"""What a worker process keeps between jobs: the base model (loaded once) and the judge.

One worker process serves one GPU with concurrency 1, so the model is loaded at most once and
shared by every job; a job leaves the weights exactly as it found them (deltas are reverted).
The lock makes the lazy load safe when the reaper or a test touches the runtime from another
thread while the first job starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from app.ml.judges import Judge, load_judge
from app.ml.models import LoadedModel, load_model
from app.settings import Settings

log = logging.getLogger(__name__)


class Runtime:
    """The base model and judge of this process, loaded on first use (or by `preload`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        model_loader: Callable[[], LoadedModel] | None = None,
        judge_loader: Callable[[], Judge] | None = None,
    ):
        self._settings = settings
        self._model_loader = model_loader or self._load_model
        self._judge_loader = judge_loader or (lambda: load_judge(settings.judge))
        self._lock = threading.Lock()
        self._lm: LoadedModel | None = None
        self._judge: Judge | None = None
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)

    @classmethod
    def of(cls, lm: LoadedModel, judge: Judge, settings: Settings) -> Runtime:
        """A runtime around an already loaded model and judge (tests, embedding)."""
        return cls(settings, model_loader=lambda: lm, judge_loader=lambda: judge)

    @property
    def lm(self) -> LoadedModel:
        with self._lock:
            if self._lm is None:
                start = time.perf_counter()
                self._lm = self._model_loader()
                log.info(
                    "model %s loaded on %s (%s) in %.1f s",
                    self._lm.name,
                    self._lm.device,
                    str(self._lm.dtype).removeprefix("torch."),
                    time.perf_counter() - start,
                )
            return self._lm

    @property
    def judge(self) -> Judge:
        with self._lock:
            if self._judge is None:
                self._judge = self._judge_loader()
            return self._judge

    @property
    def model_name(self) -> str:
        """What versions record as their base model (the `model` setting as given)."""
        return self.lm.name

    @property
    def base_fingerprint(self) -> str:
        """Identity of the loaded base for the version rows (`LoadedModel.base_fingerprint`).

        Read before the first job (or between jobs: every job reverts its deltas). Each delta blob
        also carries the fingerprint of the one parameter it edits, which `apply_deltas` checks.
        """
        return self.lm.base_fingerprint

    def preload(self) -> None:
        """Load model and judge and compute the fingerprint now, so the first job doesn't wait."""
        _ = self.base_fingerprint, self.judge

    def _load_model(self) -> LoadedModel:
        settings = self._settings
        return load_model(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            cache_dir=settings.cache_dir,
        )
