"""The rejected-messages table: what the archive could not accept, bytes as received.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create ``rejected`` and its indexes."""
    op.create_table(
        "rejected",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("received_at", sa.DateTime, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("device_id", sa.String(64)),
        sa.Column("message_id", sa.String(64)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_rejected_received", "rejected", ["received_at"])
    op.create_index("ix_rejected_device", "rejected", ["device_id", "received_at"])


def downgrade() -> None:
    """Drop ``rejected``."""
    op.drop_table("rejected")
