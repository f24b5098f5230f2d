"""The built-in generation engine: one base model, every live version served beside it in shared
batches, decoded in this process (what every engine shares is in `engine_base`).

- The base model is loaded once. A version's whole chain of deltas is read from a `VersionSource`
  on first use, checked (checksums by the store, base fingerprints here), summed per module and
  kept in an LRU cache (`VersionCache`).
- The live versions are re-read every `poll_s` seconds (and at once when a name is not known), so
  a new version is servable without restart and a retired one stops being served and leaves the
  cache.
- Requests go through one background compute thread (`batcher`): continuous batching by default
  (requests join and leave the running batch at every step), static batches when asked. Decoding
  never runs on the event loop. That thread is the only one that runs torch: version loads and
  judging are handed to it too, and the model is loaded on a thread that ends (`batcher` says why).
  `stream()` bridges its events to asyncio; when the consumer stops early (client disconnected)
  the request is cancelled and leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, TypeVar

from app.chains import chain_deltas
from app.ml.generation import _pad_id, _stop_ids
from app.ml.memory import release_free_memory
from app.ml.models import LoadedModel
from app.serving.batcher import Batcher, ContinuousBatcher
from app.serving.cache import VersionCache
from app.serving.decode_step import decode_step
from app.serving.decoding import Decoder, GenRequest, contiguous_head_input, run_batch
from app.serving.engine_base import EngineBase, EngineHealth, result_of
from app.serving.errors import UnknownModelError
from app.serving.live_versions import BASE
from app.serving.packed import pack_linears, unpack_linears
from app.serving.sampling import Event, Failed, Finished, SamplingParams
from app.serving.source import VersionInfo, VersionSource
from app.serving.weights import BatchDeltaHooks, VersionWeights, version_weights

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """A resolved `model`: its public name and its weights (None for the base)."""

    name: str
    weights: VersionWeights | None


class Engine(EngineBase):
    kind = "builtin"

    def __init__(
        self,
        lm: LoadedModel,
        source: VersionSource,
        *,
        cache_size: int = 8,
        max_batch_size: int = 8,
        max_wait_s: float = 0.01,
        batching: Literal["continuous", "static"] = "continuous",
        prefill_tokens: int = 128,
        dtype_reason: str = "",
        packed: bool = True,
        lean_step: bool = True,
        **common: Any,
    ):
        self.cache = VersionCache(cache_size)
        self._fingerprints: dict[str, str] = {}
        self._hooks = BatchDeltaHooks(lm.model)
        self._head_hook = contiguous_head_input(lm.model)
        self._decoder = Decoder(lm, self._hooks, _stop_ids(lm), _pad_id(lm))
        self.batching = batching
        self._dtype_reason = dtype_reason
        self._batcher: Batcher | ContinuousBatcher
        if batching == "static":
            self._batcher = Batcher(
                partial(run_batch, self._decoder), max_batch_size=max_batch_size,
                max_wait_s=max_wait_s,
            )  # fmt: skip
        else:
            self._batcher = ContinuousBatcher(
                self._decoder, max_batch_size=max_batch_size, max_wait_s=max_wait_s,
                prefill_tokens=prefill_tokens,
            )  # fmt: skip
        # Packing runs torch: on the compute thread, whose OpenMP team is the only one (batcher).
        self._packed = self._batcher.call(lambda: pack_linears(lm.model)) if packed else 0
        if lean_step:
            self._decoder.step = self._batcher.call(lambda: decode_step(lm.model))
        super().__init__(lm, source, **common)  # see EngineBase for the common settings
        self.refresh()

    def _on_refresh(self, live: dict[str, VersionInfo]) -> None:
        dropped = self.cache.keep_only(v.id for v in live.values())
        if dropped:
            log.info("unloaded %d retired version(s)", len(dropped))

    def add_version(self, info: VersionInfo) -> VersionWeights:
        return self.cache.get(info.id, lambda: self._load(info))

    def drop_version(self, version_id: int) -> None:
        self.cache.drop(version_id)

    def target(self, model: str) -> Target:
        """Resolve and load `model` (blocking: may read the store and build the deltas)."""
        info = self.resolve(model)
        if info is None:
            return Target(BASE, None)
        return Target(info.name, self.add_version(info))

    def _load(self, info: VersionInfo) -> VersionWeights:
        chain = self.source.load_chain(info.id)  # the store read stays off the compute thread
        if chain[-1].retired:
            raise UnknownModelError(f"version {info.name!r} is retired")
        deltas = chain_deltas(chain)
        build = partial(
            version_weights, self.lm.model, info.name, deltas,
            base_fingerprints=self._fingerprints,
        )  # fmt: skip
        weights = self._batcher.call(build)
        del chain, deltas, build  # the blobs and their tensors: only the summed weights stay cached
        release_free_memory()
        return weights

    # -- generation ------------------------------------------------------------------------

    async def stream(
        self, prompt_ids: list[int], target: Target, params: SamplingParams
    ) -> AsyncIterator[Event]:
        """The request's events, ending with `Finished` or `Failed`. Leaving early cancels it."""
        with self._admitted(1):
            [(request, events)] = self._requests([(prompt_ids, target, params)])
            self._batcher.submit(request)
            try:
                async for event in _drain(events):
                    if isinstance(event, Finished):
                        self.generated_tokens[target.name] += event.completion_tokens
                    yield event
            finally:
                request.cancelled.set()

    async def complete_together(
        self, jobs: Sequence[tuple[list[int], Target, SamplingParams]]
    ) -> list[Finished]:
        """Several requests submitted as one group, so they start together."""
        with self._admitted(len(jobs)):
            pairs = self._requests(jobs)
            self._batcher.submit(*(request for request, _ in pairs))
            try:
                waits = (result_of(_drain(events)) for _, events in pairs)
                results = list(await asyncio.gather(*waits))
                for (_ids, target, _params), result in zip(jobs, results, strict=True):
                    self.generated_tokens[target.name] += result.completion_tokens
                return results
            finally:
                for request, _ in pairs:
                    request.cancelled.set()

    def _requests(
        self, jobs: Sequence[tuple[list[int], Target, SamplingParams]]
    ) -> list[tuple[GenRequest, asyncio.Queue[Event]]]:
        loop = asyncio.get_running_loop()
        pairs = []
        for prompt_ids, target, params in jobs:
            events: asyncio.Queue[Event] = asyncio.Queue()

            def deliver(event: Event, events: asyncio.Queue[Event] = events) -> None:
                loop.call_soon_threadsafe(events.put_nowait, event)

            pairs.append((GenRequest(prompt_ids, target.weights, params, deliver), events))
        return pairs

    @property
    def cancelled(self) -> int:
        """Requests that left a batch early: their client went away."""
        return self._batcher.cancelled

    def compute(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the compute thread, between batches, and return its result (blocks): for
        torch work beside decoding, such as building an export."""
        return self._batcher.call(fn)

    @property
    def batch_sizes(self) -> list[int]:
        return self._batcher.batch_sizes

    # -- judge and life cycle --------------------------------------------------------------

    def health(self) -> EngineHealth:
        dtype = str(self.lm.dtype).removeprefix("torch.")
        why = f" ({self._dtype_reason})" if self._dtype_reason else ""
        packed = ", linear layers packed for oneDNN" if self._packed else ""
        lean = ", lean decoding steps" if self._decoder.step is not None else ""
        how = f"{self.batching} batching, {dtype} weights{why}{packed}{lean}"
        detail = f"decoding in this process: {how}"
        return EngineHealth(self.kind, True, detail)

    def close(self) -> None:
        super().close()
        self._batcher.close()
        self._hooks.remove()
        unpack_linears(self.lm.model)
        if self._head_hook is not None:
            self._head_hook.remove()


async def _drain(events: asyncio.Queue[Event]) -> AsyncIterator[Event]:
    while True:
        event = await events.get()
        yield event
        if isinstance(event, Finished | Failed):
            return


def on_passing_thread(fn: Callable[[], T]) -> T:
    """Run `fn` on a thread that ends with it: its OpenMP team goes with it (see `batcher`), so
    loading the model leaves the compute thread the only one that has run torch."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="detox-load")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]
