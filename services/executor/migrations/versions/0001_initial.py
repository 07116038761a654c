"""Runs, their steps and the event outbox.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Migrations are frozen: they spell their types out instead of importing storage's.
UtcDateTime = sa.DateTime(timezone=True)
OutboxId = sa.BigInteger().with_variant(sa.Integer, "sqlite")

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(36), primary_key=True),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("thread_id", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("output", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("error_code", sa.String(32), nullable=True),
        sa.Column("error_reason", sa.String(128), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
        sa.Column("start_time", UtcDateTime, nullable=True),
        sa.Column("end_time", UtcDateTime, nullable=True),
        sa.Column("deadline", UtcDateTime, nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=False),
        sa.Column("trace_carrier", sa.JSON, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("user_id", "request_id", name="uq_runs_user_request"),
    )
    op.create_index("ix_runs_user_created", "runs", ["user_id", "create_time", "run_id"])
    op.create_index("ix_runs_state_created", "runs", ["state", "create_time"])

    op.create_table(
        "steps",
        sa.Column(
            "run_id", sa.String(36), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("step_id", sa.String(64), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("output", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("error_code", sa.String(32), nullable=True),
        sa.Column("error_reason", sa.String(128), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("start_time", UtcDateTime, nullable=True),
        sa.Column("end_time", UtcDateTime, nullable=True),
        sa.Column("depends_on", sa.JSON, nullable=False),
        sa.Column("compensation_agent", sa.String(64), nullable=False),
    )

    op.create_table(
        "outbox",
        sa.Column("id", OutboxId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False, unique=True),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("step_id", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("create_time", UtcDateTime, nullable=False),
        sa.Column("trace_carrier", sa.JSON, nullable=False),
        sa.Column("published_time", UtcDateTime, nullable=True),
        sa.UniqueConstraint("run_id", "seq", name="uq_outbox_run_seq"),
    )
    op.create_index("ix_outbox_published_id", "outbox", ["published_time", "id"])


def downgrade() -> None:
    op.drop_index("ix_outbox_published_id", table_name="outbox")
    op.drop_table("outbox")
    op.drop_table("steps")
    op.drop_index("ix_runs_state_created", table_name="runs")
    op.drop_index("ix_runs_user_created", table_name="runs")
    op.drop_table("runs")
