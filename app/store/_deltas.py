"""Delta rows read back: every blob checked against its recorded sha256 (and, when asked, its
version against the caller's base fingerprint), and summaries that read no blob."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TypedDict

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.store._versions import get_version_by_id, version_chain
from app.store.errors import BaseFingerprintMismatch, DeltaChecksumError
from app.store.models import DeltaRow


class DeltaSummary(TypedDict):
    params: list[str]
    bytes: int
    encoding: str | None  # "dense" | "lowrank" | "mixed"; None without rows
    sha256: str


def load_delta_blobs(
    *, session: Session, version_id: int, base_fingerprint: str | None = None
) -> list[tuple[str, bytes]]:
    """The version's own delta blobs as (param, safetensors bytes), sorted by param.

    Every blob's sha256 (and length) is checked against the row: DeltaChecksumError names the
    version and param. With `base_fingerprint`, a version made for another base is refused
    (BaseFingerprintMismatch) before anything is read.
    """
    version = get_version_by_id(session=session, version_id=version_id)
    if base_fingerprint is not None and version.base_fingerprint != base_fingerprint:
        raise BaseFingerprintMismatch(version.name, base_fingerprint, version.base_fingerprint)
    query = select(DeltaRow.param, DeltaRow.blob, DeltaRow.sha256, DeltaRow.nbytes).where(
        DeltaRow.version_id == version_id
    )
    blobs: list[tuple[str, bytes]] = []
    for param, blob, sha256, nbytes in sorted(session.execute(query), key=lambda r: r[0]):
        blob = bytes(blob)
        actual = hashlib.sha256(blob).hexdigest()
        if actual != sha256 or len(blob) != nbytes:
            raise DeltaChecksumError(version.name, param, sha256, actual)
        blobs.append((param, blob))
    return blobs


class ChainBlobs(TypedDict):
    """One version of a chain: its name, its delta's summary sha256, whether it is retired, its
    blobs by param."""

    name: str
    sha256: str
    retired: bool
    blobs: list[tuple[str, bytes]]


def load_chain_blobs(
    *, session: Session, version_id: int, base_fingerprint: str | None = None
) -> list[ChainBlobs]:
    """The blobs of the version's whole chain, root first (`version_chain` order), each version's
    checked as `load_delta_blobs` checks them; `sha256` is the version's `delta_summary` one."""
    chain = version_chain(session=session, version_id=version_id)
    summaries = delta_summaries(session=session, version_ids=[v.id for v in chain])
    return [
        {
            "name": version.name,
            "sha256": summaries[version.id]["sha256"],
            "retired": version.retired,
            "blobs": load_delta_blobs(
                session=session, version_id=version.id, base_fingerprint=base_fingerprint
            ),
        }
        for version in chain
    ]


def delta_summaries(*, session: Session, version_ids: Iterable[int]) -> dict[int, DeltaSummary]:
    """`delta_summary` for many versions in one query (blobs are not read)."""
    ids = list(version_ids)
    rows: dict[int, list[tuple[str, str, int, str]]] = {i: [] for i in ids}
    query = select(
        DeltaRow.version_id, DeltaRow.param, DeltaRow.encoding, DeltaRow.nbytes, DeltaRow.sha256
    ).where(DeltaRow.version_id.in_(ids))
    for version_id, param, encoding, nbytes, sha256 in session.execute(query):
        rows[version_id].append((param, encoding, nbytes, sha256))
    return {i: _summary(sorted(r)) for i, r in rows.items()}


def delta_summary(*, session: Session, version_id: int) -> DeltaSummary:
    """{"params": sorted names, "bytes": total blob size, "encoding": "dense"|"lowrank"|"mixed",
    "sha256": sha256 of the rows' hex sha256s concatenated in param order}."""
    return delta_summaries(session=session, version_ids=[version_id])[version_id]


def _summary(rows: list[tuple[str, str, int, str]]) -> DeltaSummary:
    encodings = {encoding for _, encoding, _, _ in rows}
    encoding = encodings.pop() if len(encodings) == 1 else ("mixed" if encodings else None)
    digest = hashlib.sha256("".join(sha for *_, sha in rows).encode("ascii")).hexdigest()
    return {
        "params": [param for param, *_ in rows],
        "bytes": sum(nbytes for _, _, nbytes, _ in rows),
        "encoding": encoding,
        "sha256": digest,
    }
