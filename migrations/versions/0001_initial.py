"""Initial schema: jobs, versions, deltas, corpora, api_keys.

Revision ID: 0001
Revises:
Create Date: 2025-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)
# jobs -> versions closes a cycle (versions -> jobs): PostgreSQL adds these two once both tables
# exist; SQLite, which cannot add a constraint later, takes them inline (forward references are
# allowed there).
JOBS_VERSION_FKS = [
    ("fk_jobs_parent_version_id_versions", "parent_version_id"),
    ("fk_jobs_result_version_id_versions", "result_version_id"),
]


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def upgrade() -> None:
    inline_fks = [
        sa.ForeignKeyConstraint([column], ["versions.id"], name=name)
        for name, column in JOBS_VERSION_FKS
    ]
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(64), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("parent_version_id", sa.Integer(), nullable=True),
        sa.Column("result_version_id", sa.Integer(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("heartbeat_at", TZ, nullable=True),
        sa.CheckConstraint("kind IN ('dinm', 'unlearn', 'eval')", name=op.f("ck_jobs_kind")),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name=op.f("ck_jobs_status"),
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name=op.f("ck_jobs_progress")),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("idempotency_key", name="uq_jobs_idempotency_key"),
        *(inline_fks if _sqlite() else []),
    )
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])

    op.create_table(
        "versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("base_model", sa.String(512), nullable=False),
        sa.Column("base_fingerprint", sa.String(128), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("retired", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.CheckConstraint("kind IN ('dinm', 'unlearn')", name=op.f("ck_versions_kind")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_versions_job_id_jobs"),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["versions.id"], name="fk_versions_parent_id_versions"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_versions"),
        sa.UniqueConstraint("name", name="uq_versions_name"),
    )
    op.create_index("ix_versions_created_at", "versions", ["created_at"])
    op.create_index("ix_versions_job_id", "versions", ["job_id"])
    op.create_index("ix_versions_parent_id", "versions", ["parent_id"])
    if not _sqlite():
        for name, column in JOBS_VERSION_FKS:
            op.create_foreign_key(name, "jobs", "versions", [column], ["id"])

    op.create_table(
        "deltas",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("param", sa.String(512), nullable=False),
        sa.Column("encoding", sa.String(16), nullable=False),
        sa.Column("dtype", sa.String(32), nullable=False),
        sa.Column("shape", sa.JSON(), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("encoding IN ('dense', 'lowrank')", name=op.f("ck_deltas_encoding")),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["versions.id"],
            name="fk_deltas_version_id_versions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_deltas"),
        sa.UniqueConstraint("version_id", "param", name="uq_deltas_version_id_param"),
    )

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

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_hash", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("revoked_at", TZ, nullable=True),
        sa.CheckConstraint("role IN ('reader', 'editor', 'admin')", name=op.f("ck_api_keys_role")),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("corpora")
    op.drop_table("deltas")
    # Break the jobs <-> versions cycle before dropping either table.
    if _sqlite():
        op.execute("UPDATE jobs SET parent_version_id = NULL, result_version_id = NULL")
    else:
        for name, _column in JOBS_VERSION_FKS:
            op.drop_constraint(name, "jobs", type_="foreignkey")
    op.drop_table("versions")
    op.drop_table("jobs")
