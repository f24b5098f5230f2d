"""Tables (SQLAlchemy 2 typed ORM). The migration chain in `migrations/` creates exactly these.

Job and version JSON of the public contract is built from these rows by the API; secrets (API key
hashes) exist only here. `jobs` and `versions` refer to each other (a job's parent and result
version, a version's job), so the two foreign keys of `jobs` are created after both tables.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from app.store._types import UTCDateTime, utcnow

JOB_KINDS: Final = ("dinm", "unlearn", "eval")
JOB_STATUSES: Final = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES: Final = ("succeeded", "failed", "cancelled")
VERSION_KINDS: Final = ("dinm", "unlearn")
DELTA_ENCODINGS: Final = ("dense", "lowrank")
ROLES: Final = ("reader", "editor", "admin")
EXPERIMENT_STATUSES: Final = ("running", "stopped")

NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_one_of("kind", JOB_KINDS), name="kind"),
        CheckConstraint(_one_of("status", JOB_STATUSES), name="status"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
        Index(None, "status", "created_at"),
        Index(None, "created_at"),
        Index(None, "api_key_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # uuid4, canonical text form
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    parent_version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id", use_alter=True))
    result_version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id", use_alter=True))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    # SHA-256 of the submitting request's canonical body: tells a retry from a reused key.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    worker: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    api_key_id: Mapped[int | None] = mapped_column(Integer)  # the submitting key (no FK: see 0003)

    parent_version: Mapped[Version | None] = relationship(
        foreign_keys=[parent_version_id], lazy="joined"
    )
    result_version: Mapped[Version | None] = relationship(
        foreign_keys=[result_version_id], lazy="joined"
    )

    @property
    def parent_name(self) -> str:
        """The parent as the public contract names it: "base" or a version name."""
        return self.parent_version.name if self.parent_version is not None else "base"

    @property
    def version_name(self) -> str | None:
        """The name of the version this job produced, once it has."""
        return self.result_version.name if self.result_version is not None else None


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (
        CheckConstraint(_one_of("kind", VERSION_KINDS), name="kind"),
        Index(None, "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    base_model: Mapped[str] = mapped_column(String(512))
    base_fingerprint: Mapped[str] = mapped_column(String(128))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    retired: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    parent: Mapped[Version | None] = relationship(remote_side=[id], lazy="joined", join_depth=1)

    @property
    def parent_name(self) -> str:
        """ "base" or the parent version's name."""
        return self.parent.name if self.parent is not None else "base"


class DeltaRow(Base):
    """One parameter's update of a version: safetensors bytes, checksummed."""

    __tablename__ = "deltas"
    __table_args__ = (
        CheckConstraint(_one_of("encoding", DELTA_ENCODINGS), name="encoding"),
        UniqueConstraint("version_id", "param"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    param: Mapped[str] = mapped_column(String(512))
    encoding: Mapped[str] = mapped_column(String(16))
    dtype: Mapped[str] = mapped_column(String(32))
    shape: Mapped[list[int]] = mapped_column(JSON)
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    nbytes: Mapped[int] = mapped_column(BigInteger)


class Corpus(Base):
    """An uploaded unlearning corpus: validated JSON Lines, one normalised document a line.

    `content` is deferred (never loaded by listings); `sha256` and `nbytes` are of `content` and
    are checked when the documents are read back (`crud.corpus_documents`).
    """

    __tablename__ = "corpora"
    __table_args__ = (
        CheckConstraint(
            "documents >= 1 AND annotated >= 0 AND annotated <= documents", name="counts"
        ),
        Index(None, "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # uuid4, canonical text form
    name: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    documents: Mapped[int] = mapped_column(Integer)
    annotated: Mapped[int] = mapped_column(Integer)  # documents with explicit harmful_spans
    nbytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)


class ApiKey(Base):
    """An API key, stored only as its hash."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint(_one_of("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(128), unique=True)
    prefix: Mapped[str | None] = mapped_column(String(16))  # the key's first characters, shown
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Experiment(Base):
    """An A/B experiment on live traffic: weighted arms (`[{"model", "weight"}]`, immutable once
    created, so a user's arm never changes), the judge of its outcomes, and once stopped, the
    arm that takes all its traffic (`winner`; NULL: the base model)."""

    __tablename__ = "experiments"
    __table_args__ = (
        CheckConstraint(_one_of("status", EXPERIMENT_STATUSES), name="status"),
        Index(None, "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    arms: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    judge: Mapped[str] = mapped_column(String(32))
    keep_text: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    winner: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    api_key_id: Mapped[int | None] = mapped_column(Integer)  # the creating key (as jobs.api_key_id)


class ExperimentOutcome(Base):
    """One response served in an experiment: its arm (the assignment), what it cost, the
    judge's verdict once judged (NULL `judged_at`: not yet, or `judge_error` says why not) and
    the client's feedback. Text only when the experiment keeps it."""

    __tablename__ = "experiment_outcomes"
    __table_args__ = (Index(None, "experiment_id", "arm"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    response_id: Mapped[str] = mapped_column(String(64), unique=True)
    arm: Mapped[str] = mapped_column(String(64))
    user_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    latency_ms: Mapped[float] = mapped_column(Float)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    judged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    unsafe: Mapped[bool | None] = mapped_column(Boolean)
    unsafe_score: Mapped[float | None] = mapped_column(Float)
    refused: Mapped[bool | None] = mapped_column(Boolean)
    judge_error: Mapped[str | None] = mapped_column(String(500))
    feedback: Mapped[float | None] = mapped_column(Float)
    feedback_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    prompt: Mapped[str | None] = mapped_column(Text)
    response: Mapped[str | None] = mapped_column(Text)
