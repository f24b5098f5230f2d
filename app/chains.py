"""A version's chain, read from the store into verified deltas: the one way the worker (a job's
parent), the serving engine (a version to serve) and an export read it.

The store checks each blob's sha256 and, given the loaded base's fingerprint, that every version
of the chain was made for that base; parsing the blobs into `Delta`s needs torch, which is why
this sits above the store rather than in it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.ml.deltas import Delta
from app.ml.errors import DeltaError
from app.store import crud
from app.store.errors import BaseFingerprintMismatch, DeltaChecksumError


class UnreadableChain(Exception):
    """A version of the chain is corrupt (checksum, bytes) or was made for another base."""


@dataclass(frozen=True)
class ChainLink:
    """One version of a chain: its name, its delta summary's sha256, and its deltas."""

    name: str
    sha256: str
    retired: bool
    deltas: list[Delta]


def read_chain(
    session: Session, version_id: int, *, base_fingerprint: str | None
) -> list[ChainLink]:
    """The version and its ancestors, root first: apply their deltas in this order. Raises the
    store's NotFound for an unknown version, UnreadableChain for a corrupt or foreign one."""
    try:
        links = crud.load_chain_blobs(
            session=session, version_id=version_id, base_fingerprint=base_fingerprint
        )
    except (BaseFingerprintMismatch, DeltaChecksumError) as exc:
        raise UnreadableChain(str(exc)) from exc
    return [
        ChainLink(
            link["name"],
            link["sha256"],
            link["retired"],
            [_parsed(link["name"], param, blob) for param, blob in link["blobs"]],
        )
        for link in links
    ]


def chain_deltas(chain: list[ChainLink]) -> list[Delta]:
    """Every delta of the chain, in the order to apply them."""
    return [delta for link in chain for delta in link.deltas]


def _parsed(version: str, param: str, blob: bytes) -> Delta:
    try:
        return Delta.from_bytes(blob)
    except DeltaError as exc:
        raise UnreadableChain(f"version {version!r}, {param}: {exc}") from exc
