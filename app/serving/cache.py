"""An LRU cache of loaded versions (summed deltas), loading each name at most once at a time."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

from app.serving.weights import VersionWeights


class VersionCache:
    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"cache size must be at least 1, got {size}")
        self.size = size
        self._items: OrderedDict[int, VersionWeights] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[int, threading.Lock] = {}
        self.loads = 0  # versions read from the source (misses), for tests and metrics
        self.hits = 0

    def get(self, version_id: int, load: Callable[[], VersionWeights]) -> VersionWeights:
        """The cached weights of `version_id`, loaded with `load()` on a miss (one loader per id;
        concurrent callers for the same id wait for it)."""
        with self._lock:
            if version_id in self._items:
                self.hits += 1
                self._items.move_to_end(version_id)
                return self._items[version_id]
            loading = self._loading.setdefault(version_id, threading.Lock())
        with loading:
            with self._lock:
                if version_id in self._items:  # another caller loaded it meanwhile
                    self.hits += 1
                    self._items.move_to_end(version_id)
                    return self._items[version_id]
            weights = load()
            with self._lock:
                self.loads += 1
                self._items[version_id] = weights
                self._items.move_to_end(version_id)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
                self._loading.pop(version_id, None)
            return weights

    def keep_only(self, version_ids: Iterable[int]) -> list[int]:
        """Drop every cached version not in `version_ids` (retired ones); returns the dropped."""
        keep = set(version_ids)
        with self._lock:
            dropped = [i for i in self._items if i not in keep]
            for i in dropped:
                del self._items[i]
        return dropped

    def drop(self, version_id: int) -> None:
        with self._lock:
            self._items.pop(version_id, None)

    def __contains__(self, version_id: object) -> bool:
        with self._lock:
            return version_id in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
