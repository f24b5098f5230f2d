"""An uploaded corpus as the API shows it: counts and checksum, never its documents."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.store.models import Corpus


class CorpusPublic(BaseModel):
    id: str
    name: str | None
    documents: int = Field(description="documents in the corpus")
    annotated: int = Field(description="documents with explicit harmful_spans")
    bytes: int = Field(description="size of the stored (normalised) JSON Lines")
    sha256: str = Field(description="sha256 of the stored JSON Lines")
    created_at: datetime

    @classmethod
    def from_row(cls, corpus: Corpus) -> CorpusPublic:
        return cls(
            id=corpus.id,
            name=corpus.name,
            documents=corpus.documents,
            annotated=corpus.annotated,
            bytes=corpus.nbytes,
            sha256=corpus.sha256,
            created_at=corpus.created_at,
        )


class CorpusList(BaseModel):
    data: list[CorpusPublic]
