"""What every generation engine shares, whatever decodes: the live versions, prompts as the base
model's tokenizer encodes them, the token budget, admission (a bounded number of requests in
flight), the judge, and the count of generated tokens per model.

An engine adds the decoding: `add_version` and `drop_version` (a version made servable, or
let go), `target` (resolve a request's model and make it servable), `stream`,
`complete_together`, `compute` (where torch work of the serving process runs), `health` and
`close`. Two engines exist: the built-in one (`app.serving.engine`, decoding in this process)
and the vLLM one (`app.serving.vllm_engine`, decoding in a vLLM server).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from app.ml.judges import Judge, Verdict, load_judge
from app.ml.models import LoadedModel
from app.ml.prompts import encode_prompt
from app.serving.errors import OverloadedError, PromptTooLargeError, PromptTooLongError
from app.serving.live_versions import LiveVersions
from app.serving.sampling import Event, Failed, Finished, SamplingParams
from app.serving.source import Subscribe, VersionInfo, VersionSource

T = TypeVar("T")


class Target(Protocol):
    """A resolved `model` as an engine serves it; the handlers read only its public name."""

    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class EngineHealth:
    engine: str  # "builtin" | "vllm"
    ok: bool
    detail: str


class EngineBase:
    kind = "engine"

    def __init__(
        self,
        lm: LoadedModel,
        source: VersionSource,
        *,
        max_tokens: int = 512,
        max_prompt_tokens: int | None = None,
        max_pending: int = 64,
        poll_s: float = 1.0,
        judge_loader: Callable[[], Judge] | None = None,
        version_events: Subscribe | None = None,
    ):
        self.lm = lm
        self.source = source
        self.max_tokens = max_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.max_pending = max_pending
        self.pending = 0  # requests admitted and not finished (touched on the event loop only)
        self.generated_tokens: Counter[str] = Counter()  # by served model, for metrics
        self._judge_loader = judge_loader or (lambda: load_judge("offline"))
        self._judge: Judge | None = None
        self.live = LiveVersions(
            source, poll_s=poll_s, version_events=version_events, on_refresh=self._on_refresh
        )

    # -- versions --------------------------------------------------------------------------

    def start_polling(self) -> None:
        self.live.start_polling()

    def refresh(self) -> None:
        self.live.refresh()

    def _on_refresh(self, live: dict[str, VersionInfo]) -> None:
        """What the engine does with a new list of live versions (drop the retired ones)."""

    def add_version(self, info: VersionInfo) -> Any:
        """Make a live version servable (blocking); returns what `target` serves it as."""
        raise NotImplementedError

    def drop_version(self, version_id: int) -> None:
        """Stop holding a version (retired, or no longer wanted); a no-op if it is not held."""
        raise NotImplementedError

    def versions(self) -> list[VersionInfo]:
        """The live versions, oldest first."""
        return self.live.versions()

    def resolve(self, model: str) -> VersionInfo | None:
        """The live version `model` names (None for the base); re-reads the list once on a miss."""
        return self.live.resolve(model)

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

    def target(self, model: str) -> Any:
        """Resolve `model` and make it servable (blocking); the result has the public `name`."""
        raise NotImplementedError

    def stream(
        self, prompt_ids: list[int], target: Any, params: SamplingParams
    ) -> AsyncIterator[Event]:
        """The request's events, ending with `Finished` or `Failed`. Leaving early cancels it."""
        raise NotImplementedError

    async def complete_together(
        self, jobs: Sequence[tuple[list[int], Any, SamplingParams]]
    ) -> list[Finished]:
        """Several requests submitted as one group, so they run in the same batch."""
        raise NotImplementedError

    async def complete(
        self, prompt_ids: list[int], target: Any, params: SamplingParams
    ) -> Finished:
        [result] = await self.complete_together([(prompt_ids, target, params)])
        return result

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

    def compute(self, fn: Callable[[], T]) -> T:
        """Run torch work of the serving process (an export, the judge) where the engine runs
        it, and return its result (blocks)."""
        raise NotImplementedError

    # -- judge and life cycle --------------------------------------------------------------

    def verdicts(
        self, prompts: Sequence[str], texts: Sequence[str], *, harmful: bool = True
    ) -> tuple[str, list[Verdict]]:
        """(judge name, the configured judge's verdict per text, the prompts judged as harmful
        requests or, with `harmful=False`, as everyday ones), through `compute`; blocks.
        A judge that fails to load is tried again next time."""

        def judge() -> tuple[str, list[Verdict]]:
            if self._judge is None:
                self._judge = self._judge_loader()
            return self._judge.name, self._judge.judge(list(prompts), list(texts), harmful=harmful)

        return self.compute(judge)

    def health(self) -> EngineHealth:
        raise NotImplementedError

    def close(self) -> None:
        self.live.close()


async def result_of(events: AsyncIterator[Event]) -> Finished:
    """The `Finished` event of a request's events; a `Failed` one raises its error."""
    async for event in events:
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Finished):
            return event
    raise RuntimeError("the request ended without a result")  # pragma: no cover
