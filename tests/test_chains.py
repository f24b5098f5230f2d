"""`read_chain`: a version's chain from the store as parsed, verified deltas, root first."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.chains import UnreadableChain, chain_deltas, read_chain
from app.ml.deltas import Delta, DenseUpdate
from app.store import crud
from app.store.errors import NotFound
from app.store.models import DeltaRow
from tests.store.factories import FINGERPRINT, delta, version

PARAM = "model.layers.1.mlp.down_proj.weight"


def _blob(value: float) -> bytes:
    return Delta({PARAM: DenseUpdate(torch.full((2, 3), value))}, FINGERPRINT).to_bytes()


def test_the_chain_is_root_first_with_each_versions_deltas(session: Session):
    root = version(session, name="root", deltas=[delta(PARAM, _blob(1.0))])
    leaf = version(session, name="leaf", parent=root, deltas=[delta(PARAM, _blob(2.0))])
    crud.retire_version(session=session, name="leaf")
    chain = read_chain(session, leaf.id, base_fingerprint=FINGERPRINT)
    assert [(link.name, link.retired) for link in chain] == [("root", False), ("leaf", True)]
    assert chain[1].sha256 == crud.delta_summary(session=session, version_id=leaf.id)["sha256"]
    values = [d.updates[PARAM].dense().flatten()[0].item() for d in chain_deltas(chain)]
    assert values == [1.0, 2.0]


def test_a_foreign_or_corrupt_chain_is_unreadable(session: Session):
    made = version(session, name="made", deltas=[delta(PARAM, _blob(1.0))])
    with pytest.raises(UnreadableChain, match="base fingerprint"):
        read_chain(session, made.id, base_fingerprint="0" * 64)
    garbled = version(session, name="garbled", deltas=[delta(PARAM, b"not safetensors")])
    with pytest.raises(UnreadableChain, match=f"'garbled', {PARAM}"):
        read_chain(session, garbled.id, base_fingerprint=FINGERPRINT)
    session.execute(update(DeltaRow).where(DeltaRow.version_id == made.id).values(sha256="0" * 64))
    session.commit()
    with pytest.raises(UnreadableChain, match="corrupt"):
        read_chain(session, made.id, base_fingerprint=None)
    with pytest.raises(NotFound):
        read_chain(session, 10_000, base_fingerprint=None)
