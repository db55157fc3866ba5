"""The initial archive: results, devices, boots, alerts.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the four tables and their indexes."""
    op.create_table(
        "results",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(64), nullable=False, unique=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("boot_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("slide_id", sa.String(128), nullable=False),
        sa.Column("scan_id", sa.String(128), nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=False),
        sa.Column("received_at", sa.DateTime, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("outcome_reason", sa.Text),
        sa.Column("outcome_stage", sa.String(64)),
        sa.Column("review", sa.Boolean, nullable=False),
        sa.Column("label", sa.String(64)),
        sa.Column("risk", sa.String(16)),
        sa.Column("p_high", sa.Float),
        sa.Column("model_name", sa.String(128)),
        sa.Column("model_version", sa.BigInteger),
        sa.Column("model_sha256", sa.String(64)),
        sa.Column("payload", sa.Text, nullable=False),
    )
    op.create_index("ix_results_finished", "results", ["finished_at"])
    op.create_index("ix_results_device_finished", "results", ["device_id", "finished_at"])
    op.create_index("ix_results_slide", "results", ["slide_id"])
    op.create_index("ix_results_boot_seq", "results", ["device_id", "boot_id", "seq"])
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("availability", sa.String(16)),
        sa.Column("availability_at", sa.DateTime),
        sa.Column("status", sa.Text),
        sa.Column("status_at", sa.String(40)),
        sa.Column("ota_state", sa.Text),
        sa.Column("last_result_at", sa.DateTime),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "boots",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("boot_id", sa.String(128), primary_key=True),
        sa.Column("max_seq", sa.BigInteger, nullable=False),
        sa.Column("first_seen", sa.DateTime, nullable=False),
    )
    op.create_table(
        "alerts",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(300), nullable=False, unique=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("boot_id", sa.String(128)),
        sa.Column("message_id", sa.String(64)),
        sa.Column("seq_from", sa.BigInteger),
        sa.Column("seq_to", sa.BigInteger),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("resolved_at", sa.DateTime),
    )
    op.create_index("ix_alerts_open", "alerts", ["resolved_at", "created_at"])
    op.create_index("ix_alerts_device", "alerts", ["device_id", "created_at"])


def downgrade() -> None:
    """Drop everything."""
    for table in ("alerts", "boots", "devices", "results"):
        op.drop_table(table)
