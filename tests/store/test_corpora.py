"""Corpora in the store (both backends): normalised JSON Lines, names, listing, deletion guarded
by active jobs, checksums verified on read; and merging eval results into a version's metrics."""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, inspect, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.ml.corpus import Document
from app.store import crud
from app.store.errors import (
    CorpusInUse,
    CorruptCorpus,
    DuplicateCorpusName,
    InvalidCorpusName,
    NotFound,
)
from app.store.models import Corpus

from .factories import version

DOCS = [
    Document("Those people are vermin.", ((17, 23),), "d1"),
    Document("no spans: marked automatically"),
    Document("nothing harmful here", ()),  # explicit [] counts as annotated
    Document('ünïcode \u2028 line separator, and a "quote"\nnewline', ((0, 7),), "42"),
]


def _count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Corpus)) or 0


def _content(session: Session, corpus_id: str) -> bytes:
    return bytes(session.scalar(select(Corpus.content).where(Corpus.id == corpus_id)))


def test_create_stores_normalised_json_lines_and_reads_them_back(session: Session):
    corpus = crud.create_corpus(session=session, documents=DOCS, name="gender")
    assert (corpus.documents, corpus.annotated, corpus.name) == (4, 3, "gender")
    content = _content(session, corpus.id)
    assert (corpus.nbytes, corpus.sha256) == (len(content), hashlib.sha256(content).hexdigest())
    lines = content.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 5  # one line a document, newline-terminated
    assert [json.loads(line) for line in lines[:-1]] == [
        {"text": "Those people are vermin.", "harmful_spans": [[17, 23]], "id": "d1"},
        {"text": "no spans: marked automatically"},
        {"text": "nothing harmful here", "harmful_spans": []},
        {"text": DOCS[3].text, "harmful_spans": [[0, 7]], "id": "42"},
    ]
    assert "ünïcode".encode() in content  # UTF-8, not \u escapes
    assert crud.corpus_documents(session=session, corpus_id=corpus.id) == DOCS
    assert crud.corpus_documents(session=session, corpus_id="gender") == DOCS


def test_get_by_id_or_name_without_loading_the_content(session: Session):
    named = crud.create_corpus(session=session, documents=DOCS[:1], name="race")
    unnamed = crud.create_corpus(session=session, documents=DOCS[:2])
    session.expunge_all()
    assert crud.get_corpus(session=session, id_or_name="race").id == named.id
    found = crud.get_corpus(session=session, id_or_name=unnamed.id)
    assert found.name is None and found.documents == 2
    assert "content" in inspect(found).unloaded
    for missing in ("nope", "00000000-0000-0000-0000-000000000000"):
        with pytest.raises(NotFound, match="no corpus"):
            crud.get_corpus(session=session, id_or_name=missing)


@pytest.mark.parametrize(
    "name",
    [
        "base",
        "LATEST",
        "bad name!",
        "-dash-first",
        "x" * 65,
        "",
        "0b3ac3a6-1c2d-4e5f-8a9b-0c1d2e3f4a5b",
    ],
)
def test_invalid_names_are_refused_and_nothing_is_stored(session: Session, name: str):
    with pytest.raises(InvalidCorpusName):
        crud.create_corpus(session=session, documents=DOCS, name=name)
    assert _count(session) == 0


def test_names_are_unique_but_optional(session: Session):
    crud.create_corpus(session=session, documents=DOCS, name="gender.v1_b-2")
    with pytest.raises(DuplicateCorpusName, match=r"gender\.v1_b-2"):
        crud.create_corpus(session=session, documents=DOCS[:1], name="gender.v1_b-2")
    crud.create_corpus(session=session, documents=DOCS)  # NULL names do not collide
    crud.create_corpus(session=session, documents=DOCS)
    assert _count(session) == 3
    assert crud.corpus_name_exists(session=session, name="gender.v1_b-2")
    assert not crud.corpus_name_exists(session=session, name="other")


def test_no_document_or_invalid_unicode_is_refused(session: Session):
    with pytest.raises(ValueError, match="at least one document"):
        crud.create_corpus(session=session, documents=[])
    with pytest.raises(ValueError, match=r"document 2: .*surrogate"):
        crud.create_corpus(session=session, documents=[DOCS[0], Document("bad \ud800")])
    assert _count(session) == 0


def test_list_is_newest_first_with_a_limit(session: Session):
    made = [crud.create_corpus(session=session, documents=DOCS[:1], name=f"c{i}") for i in range(4)]
    session.expunge_all()  # what the creation left loaded
    listed = crud.list_corpora(session=session)
    assert [c.name for c in listed] == ["c3", "c2", "c1", "c0"]
    assert [c.id for c in crud.list_corpora(session=session, limit=2)] == [made[3].id, made[2].id]
    assert all("content" in inspect(c).unloaded for c in listed)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="limit"):
            crud.list_corpora(session=session, limit=bad)


def test_delete(session: Session):
    corpus = crud.create_corpus(session=session, documents=DOCS, name="gone")
    deleted = crud.delete_corpus(session=session, id_or_name="gone")
    assert deleted.id == corpus.id and deleted.documents == 4
    assert _count(session) == 0
    with pytest.raises(NotFound):
        crud.get_corpus(session=session, id_or_name=corpus.id)
    with pytest.raises(NotFound):
        crud.delete_corpus(session=session, id_or_name="gone")


@pytest.mark.parametrize("field", ["corpus_id", "retain_corpus_id"])
def test_delete_is_refused_while_an_active_job_uses_the_corpus(session: Session, field: str):
    corpus = crud.create_corpus(session=session, documents=DOCS, name="busy")
    other = crud.create_corpus(session=session, documents=DOCS)
    spec = {"kind": "unlearn", "corpus_id": None, "retain_corpus_id": None}
    job, _ = crud.create_job(session=session, kind="unlearn", spec=spec | {field: corpus.id})
    crud.create_job(session=session, kind="unlearn", spec=spec | {field: other.id})
    crud.claim_job(session=session, job_id=job.id, worker="w")  # running counts too
    with pytest.raises(CorpusInUse, match=job.id) as caught:
        crud.delete_corpus(session=session, id_or_name=corpus.id)
    assert caught.value.jobs == [job.id]
    assert _count(session) == 2
    crud.finish_job_failed(session=session, job_id=job.id, error={"message": "x"})
    crud.delete_corpus(session=session, id_or_name="busy")  # finished jobs do not hold it
    assert _count(session) == 1


def test_a_tampered_corpus_is_refused_on_read(session: Session):
    corpus = crud.create_corpus(session=session, documents=DOCS, name="t")
    content, sha256 = _content(session, corpus.id), corpus.sha256
    tampered = content.replace(b"vermin", b"humans")
    session.execute(update(Corpus).where(Corpus.id == corpus.id).values(content=tampered))
    session.commit()
    with pytest.raises(CorruptCorpus, match="corrupt: sha256"):
        crud.corpus_documents(session=session, corpus_id=corpus.id)
    # Consistent checksum, but a line that does not parse: still refused, naming the line.
    garbage = content + b"{not json\n"
    digest = hashlib.sha256(garbage).hexdigest()
    values = {"content": garbage, "sha256": digest, "nbytes": len(garbage)}
    session.execute(update(Corpus).where(Corpus.id == corpus.id).values(**values))
    session.commit()
    with pytest.raises(CorruptCorpus, match="line 5: invalid JSON"):
        crud.corpus_documents(session=session, corpus_id=corpus.id)
    # A document count that does not match the rows' own count.
    values = {"content": content, "sha256": sha256, "nbytes": len(content), "documents": 3}
    session.execute(update(Corpus).where(Corpus.id == corpus.id).values(**values))
    session.commit()
    with pytest.raises(CorruptCorpus, match="holds 4 documents, 3 recorded"):
        crud.corpus_documents(session=session, corpus_id=corpus.id)


def test_merge_version_metrics_keeps_other_keys(session: Session, session_factory):
    made = version(session, name="m1")  # metrics {"DS": 90.0}
    result = {"gender": 55.0, "race": 61.5}
    merged = crud.merge_version_metrics(
        session=session, version_id=made.id, key="bias", value=result
    )
    assert merged.metrics == {"DS": 90.0, "bias": result}
    crud.merge_version_metrics(session=session, version_id=made.id, key="bias", value={"x": 1})
    with session_factory() as fresh:
        assert crud.get_version(session=fresh, name="m1").metrics == {"DS": 90.0, "bias": {"x": 1}}


def test_merge_reads_the_row_as_it_is_not_a_stale_copy(session_factory: sessionmaker[Session]):
    with session_factory() as first, session_factory() as second:
        made = version(first, name="m2")
        stale = crud.get_version(session=second, name="m2")  # loaded before the next merge
        crud.merge_version_metrics(session=first, version_id=made.id, key="bias", value=1)
        assert stale.metrics == {"DS": 90.0}
        crud.merge_version_metrics(session=second, version_id=made.id, key="ppl", value=2)
    with session_factory() as fresh:
        assert crud.get_version(session=fresh, name="m2").metrics == {
            "DS": 90.0,
            "bias": 1,
            "ppl": 2,
        }


def test_concurrent_merges_lose_nothing(session_factory: sessionmaker[Session]):
    with session_factory() as session:
        made = version(session, name="m3")

    def merge(i: int) -> None:
        with session_factory() as own:
            crud.merge_version_metrics(session=own, version_id=made.id, key=f"k{i}", value=i)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(merge, range(8)))
    with session_factory() as fresh:
        metrics = crud.get_version(session=fresh, name="m3").metrics
    assert metrics == {"DS": 90.0} | {f"k{i}": i for i in range(8)}


def test_merge_refuses_non_json_and_unknown_versions(session: Session):
    made = version(session, name="m4")
    for bad in (math.nan, {"ppl": math.inf}, object()):
        with pytest.raises(ValueError, match="not JSON"):
            crud.merge_version_metrics(session=session, version_id=made.id, key="x", value=bad)
    with pytest.raises(ValueError, match="key"):
        crud.merge_version_metrics(session=session, version_id=made.id, key="", value=1)
    with pytest.raises(NotFound):
        crud.merge_version_metrics(session=session, version_id=10_000, key="x", value=1)
    crud.retire_version(session=session, name="m4")  # results may land after a retirement
    crud.merge_version_metrics(session=session, version_id=made.id, key="late", value=1)
    assert crud.get_version(session=session, name="m4", include_retired=True).metrics == {
        "DS": 90.0,
        "late": 1,
    }
