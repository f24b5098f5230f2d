"""Jobs remember a hash of the request that submitted them.

`jobs.request_hash`: SHA-256 of the submitted body in canonical JSON, so that a request reusing an
`Idempotency-Key` with a different body is told so instead of being answered with the first
job (NULL: a job submitted before this revision, or without a key).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("request_hash", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "request_hash")
