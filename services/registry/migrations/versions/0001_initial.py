"""Agents and idempotency records.

Revision ID: 0001
Revises:
Create Date: 2026-01-01
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
        "agents",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("endpoint", sa.String(300), nullable=False),
        sa.Column("tools", sa.JSON, nullable=False),
        sa.Column("input_schema", sa.JSON, nullable=False),
        sa.Column("max_concurrency", sa.Integer, nullable=False),
        sa.Column("timeout_seconds", sa.Float, nullable=False),
        sa.Column("heartbeat_timeout_seconds", sa.Float, nullable=False),
        sa.Column("retry_policy", sa.JSON, nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "idempotency_records",
        sa.Column("caller", sa.String(255), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_idempotency_records_create_time", "idempotency_records", ["create_time"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_records_create_time", "idempotency_records")
    op.drop_table("idempotency_records")
    op.drop_table("agents")
