"""Retention: how far each run's events were trimmed, and the consumers that
follow all of their user's runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("trimmed_through", sa.BigInteger, nullable=False, server_default="0"))
    op.create_index("ix_events_create_time", "events", ["create_time"])
    op.create_table(
        "all_runs_consumers",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("consumer", sa.String(64), primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("all_runs_consumers")
    op.drop_index("ix_events_create_time", table_name="events")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("trimmed_through")
