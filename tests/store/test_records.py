from __future__ import annotations

import hashlib

import pytest
from sqlalchemy.orm import Session

from app.store import crud
from app.store.errors import NotFound


def test_corpus_round_trip(session: Session):
    text = "first hateful line\n\nsecond line\n"
    corpus = crud.create_corpus(session=session, name="gender", text=text)
    assert (corpus.lines, corpus.nbytes) == (2, len(text.encode()))
    assert corpus.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert crud.get_corpus(session=session, corpus_id=corpus.id).text == text
    assert [c.id for c in crud.list_corpora(session=session)] == [corpus.id]
    with pytest.raises(NotFound):
        crud.get_corpus(session=session, corpus_id="missing")


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
