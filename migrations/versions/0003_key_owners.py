"""API keys get a display prefix; jobs remember the key that submitted them.

`api_keys.prefix`: the first characters of the key, shown by listings so a person can tell keys
apart (the key itself is never stored). `jobs.api_key_id`: the submitting key (NULL: the
bootstrap key, authentication off, or a job from before this revision), indexed with the status so
that the per-key limit on active jobs is one index range. It is not a foreign key: keys are
revoked, never deleted.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("prefix", sa.String(16), nullable=True))
    op.add_column("jobs", sa.Column("api_key_id", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_api_key_id_status", "jobs", ["api_key_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_api_key_id_status", table_name="jobs")
    op.drop_column("jobs", "api_key_id")
    op.drop_column("api_keys", "prefix")
