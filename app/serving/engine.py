"""The generation engine: one base model, every live version served beside it in shared batches.

- The base model is loaded once. A version's whole chain of deltas is read from a `VersionSource`
  on first use, checked (checksums by the store, base fingerprints here), summed per module and
  kept in an LRU cache (`VersionCache`).
- The live versions are re-read every `poll_s` seconds (and at once when a name is not known), so
  a new version is servable without restart and a retired one stops being served and leaves the
  cache.
- Requests go through a `Batcher` (one background thread): the decoding loop (`run_batch`) never
  runs on the event loop. That thread is the only one that runs torch: version loads and judging
  are handed to it too, and the model is loaded on a thread that ends (see `batcher` for why).
  `stream()` bridges its events to asyncio; when the consumer stops early (client disconnected)
  the request is cancelled and leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from app.chains import chain_deltas
from app.ml.generation import _pad_id, _stop_ids
from app.ml.judges import Judge, Verdict, load_judge
from app.ml.memory import release_free_memory
from app.ml.models import LoadedModel
from app.ml.prompts import encode_prompt
from app.serving.batcher import Batcher
from app.serving.cache import VersionCache
from app.serving.decoding import GenRequest, run_batch
from app.serving.errors import (
    OverloadedError,
    PromptTooLargeError,
    PromptTooLongError,
    UnknownModelError,
)
from app.serving.sampling import Event, Failed, Finished, SamplingParams
from app.serving.source import Subscribe, Subscription, VersionInfo, VersionSource
from app.serving.weights import BatchDeltaHooks, VersionWeights, version_weights

log = logging.getLogger(__name__)

BASE = "base"
T = TypeVar("T")
LATEST = "latest"


@dataclass(frozen=True)
class Target:
    """A resolved `model`: its public name and its weights (None for the base)."""

    name: str
    weights: VersionWeights | None


class Engine:
    def __init__(
        self,
        lm: LoadedModel,
        source: VersionSource,
        *,
        cache_size: int = 8,
        max_batch_size: int = 8,
        max_wait_s: float = 0.01,
        max_tokens: int = 512,
        max_prompt_tokens: int | None = None,
        max_pending: int = 64,
        poll_s: float = 1.0,
        judge_loader: Callable[[], Judge] | None = None,
        version_events: Subscribe | None = None,
    ):
        self.lm = lm
        self.source = source
        self.cache = VersionCache(cache_size)
        self.max_tokens = max_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.max_pending = max_pending
        self.pending = 0  # requests admitted and not finished (touched on the event loop only)
        self.generated_tokens: Counter[str] = Counter()  # by served model, for metrics
        self.poll_s = poll_s
        self._judge_loader = judge_loader or (lambda: load_judge("offline"))
        self._judge: Judge | None = None
        self._lock = threading.Lock()
        self._live: dict[str, VersionInfo] = {}
        self._fingerprints: dict[str, str] = {}
        self._hooks = BatchDeltaHooks(lm.model)
        self._stop_ids = _stop_ids(lm)
        self._pad_id = _pad_id(lm)
        self._batcher = Batcher(self._run, max_batch_size=max_batch_size, max_wait_s=max_wait_s)
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None
        self._version_events = version_events
        self._subscription: Subscription | None = None
        self.cancelled = 0  # requests that left a batch early: their client went away
        self.refresh()

    # -- versions --------------------------------------------------------------------------

    def start_polling(self) -> None:
        """Poll the source; with `version_events`, also refresh as soon as a change is heard of."""
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="detox-versions", daemon=True)
            self._poller.start()
        if self._subscription is None and self._version_events is not None:
            self._subscription = self._version_events(self.refresh)

    def refresh(self) -> None:
        """Re-read the live versions; retired ones leave the cache."""
        live = {v.name: v for v in self.source.live_versions()}
        with self._lock:
            self._live = live
        dropped = self.cache.keep_only(v.id for v in live.values())
        if dropped:
            log.info("unloaded %d retired version(s)", len(dropped))

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

    def target(self, model: str) -> Target:
        """Resolve and load `model` (blocking: may read the store and build the deltas)."""
        info = self.resolve(model)
        if info is None:
            return Target(BASE, None)
        weights = self.cache.get(info.id, lambda: self._load(info))
        return Target(info.name, weights)

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

    def _poll(self) -> None:
        while not self._closed.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:
                log.warning("could not re-read the versions", exc_info=True)

    # -- prompts ---------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.lm.context_length

    @property
    def vocab_size(self) -> int:
        """Token ids the model scores: 0 .. vocab_size - 1."""
        head = self.lm.model.get_output_embeddings()
        return (
            int(head.weight.shape[0]) if head is not None else int(self.lm.model.config.vocab_size)
        )

    def token_text(self, token: int) -> str:
        """One token as text (a piece of a character may show as U+FFFD, as with OpenAI)."""
        return self.lm.tokenizer.decode([token])

    def encode_text(self, text: str) -> list[int]:
        return self.lm.tokenizer(text)["input_ids"]

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        tokenizer = self.lm.tokenizer
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return encode_prompt(tokenizer, text)

    def token_budget(self, prompt_ids: Sequence[int], requested: int | None) -> int:
        """How many new tokens the request may have: capped by the setting and the context."""
        if self.max_prompt_tokens is not None and len(prompt_ids) > self.max_prompt_tokens:
            raise PromptTooLargeError(
                f"the prompt is {len(prompt_ids)} tokens long; this server takes at most "
                f"{self.max_prompt_tokens} (DETOX_SERVING_MAX_PROMPT_TOKENS)"
            )
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise PromptTooLongError(
                f"the prompt is {len(prompt_ids)} tokens long; the model's context is "
                f"{self.context_length} tokens, which leaves no room for an answer"
            )
        return max(1, min(requested or self.max_tokens, self.max_tokens, room))

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

    async def complete(
        self, prompt_ids: list[int], target: Target, params: SamplingParams
    ) -> Finished:
        [result] = await self.complete_together([(prompt_ids, target, params)])
        return result

    async def complete_together(
        self, jobs: Sequence[tuple[list[int], Target, SamplingParams]]
    ) -> list[Finished]:
        """Several requests submitted as one group, so they run in the same batch."""
        with self._admitted(len(jobs)):
            pairs = self._requests(jobs)
            self._batcher.submit(*(request for request, _ in pairs))
            try:
                results = list(await asyncio.gather(*(_result(events) for _, events in pairs)))
                for (_ids, target, _params), result in zip(jobs, results, strict=True):
                    self.generated_tokens[target.name] += result.completion_tokens
                return results
            finally:
                for request, _ in pairs:
                    request.cancelled.set()

    @contextmanager
    def _admitted(self, count: int) -> Iterator[None]:
        """Count `count` requests in while they run; refuse them when the engine is full, so a
        flood is answered at once instead of queueing without bound."""
        if self.pending + count > self.max_pending:
            raise OverloadedError(
                f"the server is busy: {self.pending} generation requests are in progress, at "
                f"most {self.max_pending} are taken (DETOX_SERVING_MAX_PENDING); retry shortly"
            )
        self.pending += count
        try:
            yield
        finally:
            self.pending -= count

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

    def _run(self, batch: list[GenRequest]) -> None:
        self.cancelled += run_batch(
            self.lm, self._hooks, batch, stop_ids=self._stop_ids, pad_id=self._pad_id
        )

    def compute(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the compute thread, between batches, and return its result (blocks): for
        torch work beside decoding, such as building an export."""
        return self._batcher.call(fn)

    @property
    def batch_sizes(self) -> list[int]:
        return self._batcher.batch_sizes

    # -- judge and life cycle --------------------------------------------------------------

    def verdicts(
        self, prompts: Sequence[str], texts: Sequence[str], *, harmful: bool = True
    ) -> tuple[str, list[Verdict]]:
        """(judge name, the configured judge's verdict per text, the prompts judged as harmful
        requests or, with `harmful=False`, as everyday ones), on the compute thread; blocks.
        A judge that fails to load is tried again next time."""

        def judge() -> tuple[str, list[Verdict]]:
            if self._judge is None:
                self._judge = self._judge_loader()
            return self._judge.name, self._judge.judge(list(prompts), list(texts), harmful=harmful)

        return self._batcher.call(judge)

    def close(self) -> None:
        self._closed.set()
        self._batcher.close()
        if self._poller is not None:
            self._poller.join(timeout=5)
        if self._subscription is not None:
            self._subscription.stop()
        self._hooks.remove()


async def _drain(events: asyncio.Queue[Event]) -> AsyncIterator[Event]:
    while True:
        event = await events.get()
        yield event
        if isinstance(event, Finished | Failed):
            return


async def _result(events: asyncio.Queue[Event]) -> Finished:
    async for event in _drain(events):
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Finished):
            return event
    raise RuntimeError("the request ended without a result")  # pragma: no cover


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
