"""API keys, stored as hashes only (hashing is the API's business)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.store._types import utcnow
from app.store.errors import NotFound
from app.store.models import ROLES, ApiKey


def create_api_key(
    *, session: Session, name: str, key_hash: str, role: str, prefix: str | None = None
) -> ApiKey:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    key = ApiKey(name=name, key_hash=key_hash, role=role, prefix=prefix)
    session.add(key)
    session.commit()
    return key


def get_api_key(*, session: Session, key_hash: str) -> ApiKey | None:
    """The unrevoked key with this hash, or None."""
    query = select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    return session.scalars(query).one_or_none()


def get_api_key_by_id(*, session: Session, key_id: int) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key with id {key_id}")
    return key


def list_api_keys(*, session: Session, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


def count_live_api_keys(*, session: Session, role: str | None = None) -> int:
    """Unrevoked keys (of `role`, when given)."""
    query = select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None))
    if role is not None:
        query = query.where(ApiKey.role == role)
    return int(session.scalar(query) or 0)


def revoke_api_key(*, session: Session, key_id: int) -> ApiKey:
    """Revoke (idempotent: a revoked key keeps its first revocation time)."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key with id {key_id}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.commit()
    return key
