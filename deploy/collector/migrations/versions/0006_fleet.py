"""Fleet: device groups, rollouts, each device's step in a rollout, and OTA outcomes.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create device_groups, rollouts, rollout_devices and ota_events."""
    op.create_table(
        "device_groups",
        sa.Column("group_name", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("added_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("bundle_sha256", sa.String(64), nullable=False),
        sa.Column("bundle_name", sa.String(128), nullable=False),
        sa.Column("bundle_version", sa.BigInteger, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("canary", sa.Integer, nullable=False),
        sa.Column("wave_size", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("active_key", sa.String(64), unique=True),
        sa.Column("owner", sa.String(200)),
        sa.Column("heartbeat_at", sa.DateTime),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_rollouts_bundle", "rollouts", ["bundle_sha256", "created_at"])
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", _Id, primary_key=True),
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("version", sa.BigInteger),
        sa.Column("detail", sa.Text),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "ota_events",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("correlation_id", sa.String(128), nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("version", sa.BigInteger),
        sa.Column("reason", sa.Text),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("device_id", "correlation_id", "step", name="uq_ota_events_offer_step"),
    )
    op.create_index("ix_ota_events_device", "ota_events", ["device_id", "at"])


def downgrade() -> None:
    """Drop the fleet tables."""
    op.drop_index("ix_ota_events_device", table_name="ota_events")
    op.drop_table("ota_events")
    op.drop_table("rollout_devices")
    op.drop_index("ix_rollouts_bundle", table_name="rollouts")
    op.drop_table("rollouts")
    op.drop_table("device_groups")
