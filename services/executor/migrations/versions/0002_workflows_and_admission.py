"""Workflow step inputs and completion order, winding-down runs, admission ticks.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("ending", sa.String(16), nullable=True))
    op.add_column("runs", sa.Column("admission", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("steps", sa.Column("input", sa.JSON(none_as_null=True), nullable=True))
    op.add_column("steps", sa.Column("completion", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("steps") as steps:
        steps.drop_column("completion")
        steps.drop_column("input")
    with op.batch_alter_table("runs") as runs:
        runs.drop_column("admission")
        runs.drop_column("ending")
