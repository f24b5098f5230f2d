"""Uploaded unlearning corpora: validated documents stored as normalised JSON Lines, checksummed.

One document a line, as `app.ml.corpus.document_json` writes it: `{"text": ..., "harmful_spans":
[[a, b], ...] (only when the document has explicit spans), "id": ... (only when it has one)}`.
`sha256` and `nbytes` are of the stored content and are verified before the documents are read
back.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from app.ml.corpus import CorpusError, Document, document_json, parse_line
from app.store._rows import MAX_PAGE, add_unique, name_problem
from app.store.errors import (
    CorpusInUse,
    CorruptCorpus,
    DuplicateCorpusName,
    InvalidCorpusName,
    NotFound,
)
from app.store.models import Corpus, Job


def check_corpus_name(name: str) -> str:
    """`name` if it may name a corpus: the rules of version names (1-64 of [A-Za-z0-9._-],
    alphanumeric first, not "base"/"latest"), and not of a corpus id's form (a UUID)."""
    problem = name_problem(name, "corpus")
    if problem is not None:
        raise InvalidCorpusName(problem)
    if _is_uuid(name):
        raise InvalidCorpusName(f"invalid corpus name {name!r}: it looks like a corpus id")
    return name


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def corpus_line(document: Document) -> bytes:
    """One stored line (newline included); ValueError for text that is not valid Unicode."""
    try:
        return json.dumps(document_json(document), ensure_ascii=False).encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        raise ValueError("the text holds an unpaired surrogate (not valid Unicode)") from None


def create_corpus(
    *, session: Session, documents: Iterable[Document], name: str | None = None
) -> Corpus:
    """Store the documents (at least one) as a corpus; `name` is optional and unique.

    Raises InvalidCorpusName, DuplicateCorpusName (also when a concurrent upload took the name
    first), or ValueError (no document, invalid Unicode); nothing is written then.
    """
    if name is not None:
        check_corpus_name(name)
    content = bytearray()
    count = annotated = 0
    for number, document in enumerate(documents, start=1):
        try:
            content += corpus_line(document)
        except ValueError as exc:
            raise ValueError(f"document {number}: {exc}") from None
        count += 1
        annotated += document.harmful_spans is not None
    if not count:
        raise ValueError("a corpus needs at least one document")
    data = bytes(content)
    corpus = Corpus(
        id=str(uuid.uuid4()),
        name=name,
        documents=count,
        annotated=annotated,
        nbytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content=data,
    )

    def clash() -> Exception | None:
        taken = name is not None and corpus_name_exists(session=session, name=name)
        return DuplicateCorpusName(name) if taken else None

    add_unique(session, corpus, clash=clash)
    return corpus


def corpus_name_exists(*, session: Session, name: str) -> bool:
    return session.scalar(select(Corpus.id).where(Corpus.name == name)) is not None


def get_corpus(*, session: Session, id_or_name: str) -> Corpus:
    """The corpus with this id or name (its content is not loaded); raises NotFound."""
    query = select(Corpus).where(or_(Corpus.id == id_or_name, Corpus.name == id_or_name))
    corpus = session.scalars(query.limit(1)).first()
    if corpus is None:
        raise NotFound(f"no corpus {id_or_name!r}")
    return corpus


def list_corpora(*, session: Session, limit: int = 100) -> list[Corpus]:
    """Newest first, at most `limit` (contents are not loaded)."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be within 1..{MAX_PAGE}, not {limit}")
    query = select(Corpus).order_by(Corpus.created_at.desc(), Corpus.id.desc()).limit(limit)
    return list(session.scalars(query))


def delete_corpus(*, session: Session, id_or_name: str) -> Corpus:
    """Delete a corpus; returns its row as it was (without content). Raises NotFound, or
    CorpusInUse while a queued or running job names it (finished jobs keep its id only)."""
    corpus = get_corpus(session=session, id_or_name=id_or_name)
    users = _active_jobs_using(session, corpus.id)
    if users:
        raise CorpusInUse(corpus.name or corpus.id, users)
    session.execute(
        delete(Corpus).where(Corpus.id == corpus.id).execution_options(synchronize_session=False)
    )
    session.commit()
    session.expunge(corpus)
    return corpus


def _active_jobs_using(session: Session, corpus_id: str) -> list[str]:
    spec = Job.spec
    query = (
        select(Job.id)
        .where(Job.status.in_(("queued", "running")), Job.kind == "unlearn")
        .where(
            or_(
                spec["corpus_id"].as_string() == corpus_id,
                spec["retain_corpus_id"].as_string() == corpus_id,
            )
        )
        .order_by(Job.created_at)
    )
    return list(session.scalars(query))


def corpus_documents(*, session: Session, corpus_id: str) -> list[Document]:
    """The corpus's documents, in upload order. The content is checked against its recorded
    sha256, length and document count first (CorruptCorpus); raises NotFound."""
    corpus = get_corpus(session=session, id_or_name=corpus_id)
    content = session.scalar(select(Corpus.content).where(Corpus.id == corpus.id))
    data = bytes(content or b"")
    actual = hashlib.sha256(data).hexdigest()
    label = corpus.name or corpus.id
    if actual != corpus.sha256 or len(data) != corpus.nbytes:
        raise CorruptCorpus(
            f"corpus {label!r} is corrupt: sha256 {actual[:16]}... != recorded "
            f"{corpus.sha256[:16]}... ({len(data)} bytes, {corpus.nbytes} recorded)"
        )
    documents: list[Document] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            document = parse_line(raw, number)
        except CorpusError as exc:
            raise CorruptCorpus(f"corpus {label!r}: stored {exc}") from exc
        if document is not None:
            documents.append(document)
    if len(documents) != corpus.documents:
        raise CorruptCorpus(
            f"corpus {label!r} holds {len(documents)} documents, {corpus.documents} recorded"
        )
    return documents
