"""The app's handle on the engine: built on first use (or preloaded), closed at shutdown.

Torch-free at import, so the API process imports torch only when generation is first used.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from app.serving.handlers import OpenAIHandlers
from app.serving.traffic import TrafficRouter

if TYPE_CHECKING:
    from app.serving.engine_base import EngineBase as Engine


class ServingProvider:
    def __init__(self, factory: Callable[[], Engine], *, traffic: TrafficRouter | None = None):
        self._factory = factory
        self._traffic = traffic
        self._lock = threading.Lock()
        self._serving: OpenAIHandlers | None = None

    @property
    def loaded(self) -> bool:
        return self._serving is not None

    def get_sync(self) -> OpenAIHandlers:
        with self._lock:
            if self._serving is None:
                engine = self._factory()
                engine.start_polling()
                self._serving = OpenAIHandlers(engine, traffic=self._traffic)
            return self._serving

    def engine_if_loaded(self) -> Engine | None:
        """The engine, or None when nothing has loaded it yet (metrics must not load a model)."""
        serving = self._serving
        return serving.engine if serving is not None else None

    async def get(self) -> OpenAIHandlers:
        if self._serving is not None:
            return self._serving
        return await asyncio.to_thread(self.get_sync)

    def close(self) -> None:
        with self._lock:
            if self._serving is not None:
                self._serving.engine.close()
                self._serving = None
