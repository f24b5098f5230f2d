"""Serving on tiny random-weight models and a real SQLite store whose versions are written by
`crud.finish_job_succeeded` with real, serialised deltas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from app.ml.arch import ModelAdapter
from app.ml.deltas import Delta, DenseUpdate, LowRankUpdate, applied, fingerprint
from app.ml.models import LoadedModel
from app.store import crud, migrate
from app.store.db import make_engine, make_sessionmaker
from app.store.models import Version
from tests.store.factories import running_job

torch.set_num_threads(1)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'serving.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def random_delta(lm: LoadedModel, *, layer: int, seed: int, lowrank: bool = False) -> Delta:
    """A delta on one layer's MLP output projection, big enough to change greedy tokens."""
    name = ModelAdapter(lm.model).mlp_out_param_name(layer)
    shape = dict(lm.model.named_parameters())[name].shape
    gen = torch.Generator().manual_seed(seed)
    if lowrank:
        update = LowRankUpdate(
            a=torch.randn(2, shape[1], generator=gen), b=torch.randn(shape[0], 2, generator=gen)
        )
    else:
        update = DenseUpdate(torch.randn(*shape, generator=gen) * 0.5)
    return Delta({name: update}, fingerprint(lm.model, [name]))


def store_version(
    sessions: sessionmaker[Session],
    lm: LoadedModel,
    delta: Delta,
    *,
    name: str,
    parent: Version | None = None,
) -> Version:
    """A version written as a worker writes it: one single-parameter blob per parameter."""
    rows = [
        {
            "param": param,
            "encoding": delta.updates[param].encoding,
            "dtype": "float32",
            "shape": list(delta.updates[param].shape),
            "blob": Delta({param: delta.updates[param]}, delta.base_fingerprint).to_bytes(),
        }
        for param in delta.params
    ]
    with sessions() as session:
        job = running_job(session, parent_version_id=parent.id if parent else None)
        return crud.finish_job_succeeded(
            session=session,
            job_id=job.id,
            version_name=name,
            base_model=lm.name,
            base_fingerprint=lm.base_fingerprint,
            metrics={},
            deltas=rows,
        )


def merged_greedy(lm, prompt_ids: list[int], deltas, max_new_tokens: int) -> list[int]:
    """Reference: the version's deltas merged into the weights, transformers' own generate."""
    with applied(lm.model, deltas), torch.inference_mode():
        out = lm.model.generate(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=lm.tokenizer.eos_token_id,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()
