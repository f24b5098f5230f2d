"""Experiments name the version of the offline judge that judges their outcomes.

The offline judge is versioned by name (`offline/1`, `offline/2`; the spec "offline" is the
newest, and is stored as the version it means when an experiment is created). An experiment
stored before this revision with judge "offline" was judged by `offline/1`, so it keeps that
judge: its outcomes are never judged by two versions.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("UPDATE experiments SET judge = 'offline/1' WHERE judge = 'offline'")


def downgrade() -> None:
    op.execute("UPDATE experiments SET judge = 'offline' WHERE judge = 'offline/1'")
