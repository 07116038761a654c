"""The event log, runs, and durable consumers' positions and deliveries.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(128), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("completed_seq", sa.BigInteger, nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_runs_user_id", "runs", ["user_id", "create_time"])
    op.create_table(
        "events",
        sa.Column("run_id", sa.String(128), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("event_id", sa.String(128), nullable=False, unique=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("type", sa.Integer, nullable=False),
        sa.Column("step_id", sa.String(256), nullable=False),
        sa.Column("agent", sa.String(128), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("traceparent", sa.String(256), nullable=False),
        sa.Column("tracestate", sa.String(512), nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "consumer_positions",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("consumer", sa.String(64), primary_key=True),
        sa.Column("run_id", sa.String(128), primary_key=True),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("acked_through", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_consumer_positions_run", "consumer_positions", ["user_id", "run_id"])
    op.create_table(
        "consumer_deliveries",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("consumer", sa.String(64), primary_key=True),
        sa.Column("run_id", sa.String(128), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("state", sa.SmallInteger, nullable=False),
    )
    op.create_index(
        "ix_consumer_deliveries_event", "consumer_deliveries", ["user_id", "consumer", "event_id"]
    )
    op.create_index("ix_consumer_deliveries_run", "consumer_deliveries", ["user_id", "run_id"])


def downgrade() -> None:
    op.drop_table("consumer_deliveries")
    op.drop_table("consumer_positions")
    op.drop_table("events")
    op.drop_table("runs")
