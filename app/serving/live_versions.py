"""The live versions an engine serves: read from a `VersionSource`, re-read every `poll_s`
seconds (and at once when a name is not known, or when a change is announced), and resolved
from a request's `model` (`base`, `latest` or a version's name). Torch-free; shared by the
built-in engine and the vLLM one, which each act on a refresh (`on_refresh`) in their own way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from app.serving.errors import UnknownModelError
from app.serving.source import Subscribe, Subscription, VersionInfo, VersionSource

log = logging.getLogger(__name__)

BASE = "base"
LATEST = "latest"


class LiveVersions:
    def __init__(
        self,
        source: VersionSource,
        *,
        poll_s: float = 1.0,
        version_events: Subscribe | None = None,
        on_refresh: Callable[[dict[str, VersionInfo]], None] | None = None,
    ):
        self.source = source
        self.poll_s = poll_s
        self._on_refresh = on_refresh or (lambda _live: None)
        self._version_events = version_events
        self._lock = threading.Lock()
        self._live: dict[str, VersionInfo] = {}
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None
        self._subscription: Subscription | None = None

    def start_polling(self) -> None:
        """Poll the source; with `version_events`, also refresh as soon as a change is heard of."""
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="detox-versions", daemon=True)
            self._poller.start()
        if self._subscription is None and self._version_events is not None:
            self._subscription = self._version_events(self.refresh)

    def refresh(self) -> None:
        """Re-read the live versions, then tell the engine (`on_refresh`)."""
        live = {v.name: v for v in self.source.live_versions()}
        with self._lock:
            self._live = live
        self._on_refresh(live)

    def versions(self) -> list[VersionInfo]:
        """The live versions, oldest first."""
        with self._lock:
            return sorted(self._live.values(), key=lambda v: (v.created_at, v.id))

    def resolve(self, model: str) -> VersionInfo | None:
        """The live version `model` names (None for the base); re-reads the list once on a miss."""
        if model == BASE:
            return None
        for attempt in range(2):
            versions = self.versions()
            if model == LATEST and versions:
                return versions[-1]
            found = next((v for v in versions if v.name == model), None)
            if found is not None:
                return found
            if attempt == 0:
                self.refresh()
        if model == LATEST:
            raise UnknownModelError("there is no live version yet, so no `latest`")
        raise UnknownModelError(f"the model {model!r} does not exist (or is retired)")

    def _poll(self) -> None:
        while not self._closed.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:
                log.warning("could not re-read the versions", exc_info=True)

    def close(self) -> None:
        self._closed.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
        if self._subscription is not None:
            self._subscription.stop()
