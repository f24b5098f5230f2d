"""/v1/keys: create (the key is in this one answer only), list and revoke API keys; admin only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Query, Request

from app.api.auth import issue_key, require
from app.api.deps import SessionDep
from app.api.errors import CONFLICT, ApiError
from app.api.schemas import KeyCreate, KeyCreated, KeyList, KeyPublic
from app.store import crud

KEY_EXAMPLES = {
    "editor": {"summary": "a key for a CI job", "value": {"name": "ci-bot", "role": "editor"}},
    "reader": {"summary": "a key for an application", "value": {"name": "chat-app"}},
}
router = APIRouter(prefix="/v1/keys", tags=["keys"], dependencies=[Depends(require("admin"))])


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(
    body: Annotated[KeyCreate, Body(openapi_examples=KEY_EXAMPLES)], session: SessionDep
) -> KeyCreated:
    """A new key with a role. Store it now: only its hash is kept, it is never shown again."""
    row, key = issue_key(session=session, name=body.name, role=body.role)
    return KeyCreated(**KeyPublic.from_row(row).model_dump(), key=key)


@router.get("", response_model=KeyList)
def list_keys(
    session: SessionDep,
    include_revoked: Annotated[bool, Query(description="list revoked keys too")] = False,
) -> KeyList:
    keys = crud.list_api_keys(session=session, include_revoked=include_revoked)
    return KeyList(data=[KeyPublic.from_row(k) for k in keys])


@router.delete("/{key_id}", response_model=KeyPublic)
def revoke_key(
    key_id: Annotated[int, Path(ge=1, le=2**63 - 1, description="the key's id")],
    request: Request,
    session: SessionDep,
) -> KeyPublic:
    """Revoke a key (idempotent). The last live admin key is kept unless a bootstrap key
    (DETOX_ADMIN_KEY) exists, so that keys can still be managed."""
    key = crud.get_api_key_by_id(session=session, key_id=key_id)
    settings = request.app.state.settings
    if (
        key.role == "admin"
        and key.revoked_at is None
        and settings.admin_key is None
        and crud.count_live_api_keys(session=session, role="admin") <= 1
    ):
        raise ApiError(
            409,
            "this is the last admin key: create another admin key first (or set "
            "DETOX_ADMIN_KEY), else no one could manage keys any more",
            type=CONFLICT,
            code="last_admin_key",
        )
    revoked = crud.revoke_api_key(session=session, key_id=key_id)
    request.app.state.key_cache.clear()  # this process stops accepting it at once
    return KeyPublic.from_row(revoked)
