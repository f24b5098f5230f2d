"""Corpora as validated JSON Lines: optional unique name, document counts, checksummed content.

0001's `corpora` (a required name, plain text with one example a line) is replaced. Rows it may
hold are carried over: each non-blank line becomes a document `{"text": line}`; a name is kept
when it is a valid corpus name not already taken (else NULL); a row with no line is dropped.
The downgrade goes back the same way (one document's text a line, spans are lost).

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-29
"""

import hashlib
import json
import re
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)
# The corpus-name rules of this revision (app.store._corpora), frozen here.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RESERVED = {"base", "latest"}

old_corpora = sa.table(
    "corpora",
    sa.column("id", sa.String),
    sa.column("name", sa.String),
    sa.column("lines", sa.Integer),
    sa.column("nbytes", sa.BigInteger),
    sa.column("sha256", sa.String),
    sa.column("text", sa.Text),
    sa.column("created_at", TZ),
)
new_corpora = sa.table(
    "corpora",
    sa.column("id", sa.String),
    sa.column("name", sa.String),
    sa.column("created_at", TZ),
    sa.column("documents", sa.Integer),
    sa.column("annotated", sa.Integer),
    sa.column("nbytes", sa.BigInteger),
    sa.column("sha256", sa.String),
    sa.column("content", sa.LargeBinary),
)


def _valid_name(name: str | None) -> bool:
    if not name or name.lower() in _RESERVED or not _NAME.fullmatch(name):
        return False
    try:
        uuid.UUID(name)
    except ValueError:
        return True
    return False  # a name must not look like a corpus id


def upgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(
            old_corpora.c.id, old_corpora.c.name, old_corpora.c.text, old_corpora.c.created_at
        )
    ).all()
    op.drop_table("corpora")
    op.create_table(
        "corpora",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(64), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("documents", sa.Integer(), nullable=False),
        sa.Column("annotated", sa.Integer(), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint(
            "documents >= 1 AND annotated >= 0 AND annotated <= documents",
            name=op.f("ck_corpora_counts"),
        ),
        sa.PrimaryKeyConstraint("id", name="pk_corpora"),
        sa.UniqueConstraint("name", name="uq_corpora_name"),
    )
    op.create_index("ix_corpora_created_at", "corpora", ["created_at"])
    taken: set[str] = set()
    for corpus_id, name, text, created_at in rows:
        lines = [
            json.dumps({"text": line}, ensure_ascii=False).encode("utf-8") + b"\n"
            for line in (text or "").splitlines()
            if line.strip()
        ]
        if not lines:
            continue
        keep = _valid_name(name) and name not in taken
        if keep:
            taken.add(name)
        content = b"".join(lines)
        bind.execute(
            new_corpora.insert().values(
                id=corpus_id,
                name=name if keep else None,
                created_at=created_at,
                documents=len(lines),
                annotated=0,
                nbytes=len(content),
                sha256=hashlib.sha256(content).hexdigest(),
                content=content,
            )
        )


def downgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(
            new_corpora.c.id, new_corpora.c.name, new_corpora.c.content, new_corpora.c.created_at
        )
    ).all()
    op.drop_index("ix_corpora_created_at", table_name="corpora")
    op.drop_table("corpora")
    op.create_table(
        "corpora",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_corpora"),
    )
    for corpus_id, name, content, created_at in rows:
        texts = [
            " ".join(json.loads(line)["text"].splitlines())
            for line in bytes(content).split(b"\n")  # stored text may hold U+2028 etc.
            if line.strip()
        ]
        text = "".join(f"{t}\n" for t in texts)
        data = text.encode("utf-8")
        bind.execute(
            old_corpora.insert().values(
                id=corpus_id,
                name=name or corpus_id,
                lines=len(texts),
                nbytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                text=text,
                created_at=created_at,
            )
        )
