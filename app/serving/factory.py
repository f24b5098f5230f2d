"""The serving engine of the API process, built from the settings: the configured model, its
versions from the store (`StoreVersionSource`), and a refresh as soon as a worker announces a
new version over Redis. The one part of `app.serving` that knows Settings, the store and Redis;
the engine and the handlers only see the interfaces in `app.serving.source`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from sqlalchemy.orm import Session, sessionmaker

from app.chains import ChainLink, UnreadableChain, read_chain
from app.ml.judges import Judge, load_judge
from app.ml.models import LoadedModel, load_model, pick_device
from app.notify import VersionSubscriber, is_redis
from app.serving.dtype import serving_dtype
from app.serving.engine import Engine, on_passing_thread
from app.serving.engine_base import EngineBase
from app.serving.errors import ModelLoadError, UnknownModelError
from app.serving.source import Subscribe, VersionInfo
from app.settings import Settings
from app.store import crud
from app.store import errors as store_errors


def build_engine(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    lm: LoadedModel | None = None,
    judge_loader: Callable[[], Judge] | None = None,
) -> EngineBase:
    """The configured engine over the configured model (or `lm`, already loaded), versions from
    the store, every serving setting applied."""
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)

    dtype, dtype_reason = serving_dtype(settings.serving_dtype, pick_device(settings.device).type)
    if lm is not None:
        dtype_reason = "the model given"

    def load() -> tuple[LoadedModel, str]:
        loaded = lm if lm is not None else load_model(
            settings.model, device=settings.device, dtype=dtype, cache_dir=settings.cache_dir,
        )  # fmt: skip
        return loaded, loaded.base_fingerprint  # computed here, on the base weights

    lm, fingerprint = on_passing_thread(load)
    common = {
        "max_tokens": settings.serving_max_tokens,
        "max_prompt_tokens": settings.serving_max_prompt_tokens,
        "max_pending": settings.serving_max_pending,
        "poll_s": settings.serving_poll_s,
        "judge_loader": judge_loader
        or (lambda: load_judge(settings.judge, device=settings.device)),
        "version_events": version_events(settings.resolved_broker_url()),
    }
    source = StoreVersionSource(sessions, base_fingerprint=fingerprint)
    if settings.engine == "vllm":
        from app.serving.vllm_engine import VllmEngine

        return VllmEngine(
            lm, source, url=settings.vllm_url, adapter_dir=vllm_adapter_dir(settings),
            max_lora_rank=settings.vllm_max_lora_rank, **common,
        )  # fmt: skip
    return Engine(
        lm,
        source,
        cache_size=settings.serving_cache_size,
        max_batch_size=settings.serving_max_batch_size,
        max_wait_s=settings.serving_max_wait_ms / 1000,
        batching=settings.serving_batching,
        prefill_tokens=settings.serving_prefill_tokens,
        dtype_reason=dtype_reason,
        packed=settings.serving_packed,
        lean_step=settings.serving_lean_step,
        **common,
    )


def vllm_adapter_dir(settings: Settings) -> Path:
    return settings.vllm_adapter_dir or Path(settings.cache_dir).expanduser() / "vllm-adapters"


def version_events(broker_url: str | None) -> Subscribe | None:
    """With a Redis broker, the workers announce every new version there: hear it at once."""
    if not is_redis(broker_url):
        return None
    return lambda refresh: VersionSubscriber(broker_url, refresh).start()


class StoreVersionSource:
    """Versions and deltas from the database, through `app.store.crud` only."""

    def __init__(self, sessions: sessionmaker[Session], *, base_fingerprint: str | None = None):
        self._sessions = sessions
        self._base_fingerprint = base_fingerprint

    def live_versions(self) -> list[VersionInfo]:
        with self._sessions() as session:
            return [
                VersionInfo(v.id, v.name, v.parent_name, v.created_at)
                for v in crud.list_versions(session=session)
            ]

    def load_chain(self, version_id: int) -> list[ChainLink]:
        try:
            with self._sessions() as session:
                return read_chain(session, version_id, base_fingerprint=self._base_fingerprint)
        except store_errors.NotFound as exc:
            raise UnknownModelError(str(exc)) from exc
        except UnreadableChain as exc:
            raise ModelLoadError(str(exc)) from exc
