"""A/B experiments on live traffic: experiments and one outcome row per served response.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("arms", sa.JSON(), nullable=False),
        sa.Column("judge", sa.String(32), nullable=False),
        sa.Column("keep_text", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("winner", sa.String(64), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("stopped_at", TZ, nullable=True),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.CheckConstraint("status IN ('running', 'stopped')", name="ck_experiments_status"),
        sa.PrimaryKeyConstraint("id", name="pk_experiments"),
        sa.UniqueConstraint("name", name="uq_experiments_name"),
    )
    op.create_index("ix_experiments_created_at", "experiments", ["created_at"])
    op.create_table(
        "experiment_outcomes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("response_id", sa.String(64), nullable=False),
        sa.Column("arm", sa.String(64), nullable=False),
        sa.Column("user_hash", sa.String(64), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("finish_reason", sa.String(32), nullable=True),
        sa.Column("judged_at", TZ, nullable=True),
        sa.Column("unsafe", sa.Boolean(), nullable=True),
        sa.Column("unsafe_score", sa.Float(), nullable=True),
        sa.Column("refused", sa.Boolean(), nullable=True),
        sa.Column("judge_error", sa.String(500), nullable=True),
        sa.Column("feedback", sa.Float(), nullable=True),
        sa.Column("feedback_at", TZ, nullable=True),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("response", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            ondelete="CASCADE",
            name="fk_experiment_outcomes_experiment_id_experiments",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_experiment_outcomes"),
        sa.UniqueConstraint("response_id", name="uq_experiment_outcomes_response_id"),
    )
    op.create_index(
        "ix_experiment_outcomes_experiment_id_arm",
        "experiment_outcomes",
        ["experiment_id", "arm"],
    )


def downgrade() -> None:
    op.drop_index("ix_experiment_outcomes_experiment_id_arm", table_name="experiment_outcomes")
    op.drop_table("experiment_outcomes")
    op.drop_index("ix_experiments_created_at", table_name="experiments")
    op.drop_table("experiments")
