"""Replicas: run leases and fencing tokens, agent slots of workflow steps, the
admission lock row, and the writer of each outbox row.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Migrations are frozen: they spell their types out instead of importing storage's.
UtcDateTime = sa.DateTime(timezone=True)
RowId = sa.BigInteger().with_variant(sa.Integer, "sqlite")

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("owner", sa.String(64), nullable=True))
    op.add_column("runs", sa.Column("fence", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("runs", sa.Column("lease_expires_at", UtcDateTime, nullable=True))
    op.add_column("outbox", sa.Column("writer", sa.String(64), nullable=False, server_default=""))

    op.create_table(
        "agent_slots",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("slot_id", sa.String(36), nullable=False, unique=True),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("fence", sa.BigInteger, nullable=False),
        sa.Column("step_id", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("granted", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("create_time", UtcDateTime, nullable=False),
    )
    op.create_index("ix_agent_slots_run", "agent_slots", ["run_id"])

    lock = op.create_table(
        "admission_lock",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("tick", sa.BigInteger, nullable=False),
    )
    # The round-robin clock goes on from the newest tick handed out so far.
    newest = op.get_bind().execute(sa.text("SELECT COALESCE(MAX(admission), 0) FROM runs")).scalar()
    op.bulk_insert(lock, [{"id": 1, "tick": int(newest or 0)}])


def downgrade() -> None:
    op.drop_table("admission_lock")
    op.drop_index("ix_agent_slots_run", table_name="agent_slots")
    op.drop_table("agent_slots")
    with op.batch_alter_table("outbox") as outbox:
        outbox.drop_column("writer")
    with op.batch_alter_table("runs") as runs:
        runs.drop_column("lease_expires_at")
        runs.drop_column("fence")
        runs.drop_column("owner")
