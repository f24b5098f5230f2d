from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from app.store import crud
from app.store.errors import NotFound


def test_api_keys_by_hash_until_revoked(session: Session):
    key = crud.create_api_key(session=session, name="ci", key_hash="h1", role="editor")
    assert crud.get_api_key(session=session, key_hash="h1").id == key.id
    assert crud.get_api_key(session=session, key_hash="h2") is None
    revoked = crud.revoke_api_key(session=session, key_id=key.id)
    assert revoked.revoked_at is not None
    assert crud.get_api_key(session=session, key_hash="h1") is None
    assert crud.list_api_keys(session=session) == []
    assert len(crud.list_api_keys(session=session, include_revoked=True)) == 1
    with pytest.raises(ValueError):
        crud.create_api_key(session=session, name="x", key_hash="h3", role="root")
    with pytest.raises(NotFound):
        crud.revoke_api_key(session=session, key_id=10_000)
