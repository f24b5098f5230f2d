"""API keys: made with a role, shown once, listed by prefix (the hash never leaves the store)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.store.models import ApiKey

Role = Literal["reader", "editor", "admin"]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="who or what uses the key")
    role: Role = Field(
        "reader",
        description="reader (generate, read), editor (+ jobs, versions, corpora), admin (+ keys)",
    )


class KeyPublic(BaseModel):
    id: int
    name: str
    role: Role
    prefix: str | None = Field(description="the key's first characters, to tell keys apart")
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, key: ApiKey) -> KeyPublic:
        return cls(
            id=key.id,
            name=key.name,
            role=key.role,  # type: ignore[arg-type]
            prefix=key.prefix,
            created_at=key.created_at,
            revoked_at=key.revoked_at,
        )


class KeyCreated(KeyPublic):
    key: str = Field(description="the key itself: shown this once, never again")


class KeyList(BaseModel):
    data: list[KeyPublic]
