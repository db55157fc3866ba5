"""Device clocks bounded by the archive's: results.sort_at, devices.status_time.

A device whose clock runs ahead could pin its results on top of every list (a result dated
9999) and keep a stale status (statuses were compared by their ``at`` text).  ``sort_at`` is
``finished_at`` bounded by ``received_at`` + the allowed skew; ``status_time`` is the status's
parsed ``at`` bounded the same way.  Existing rows get the bound with no skew.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the bounded times, fill them for existing rows, index the sort key (alone and per
    device, as the lists filter and order)."""
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("sort_at", sa.DateTime, nullable=True))
    op.execute(
        "UPDATE results SET sort_at = CASE WHEN finished_at > received_at "
        "THEN received_at ELSE finished_at END"
    )
    with op.batch_alter_table("results") as batch:
        batch.alter_column("sort_at", existing_type=sa.DateTime, nullable=False)
        batch.create_index("ix_results_sort", ["sort_at"])
        batch.create_index("ix_results_device_sort", ["device_id", "sort_at"])
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("status_time", sa.DateTime, nullable=True))


def downgrade() -> None:
    """Drop the bounded times."""
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("status_time")
    with op.batch_alter_table("results") as batch:
        batch.drop_index("ix_results_device_sort")
        batch.drop_index("ix_results_sort")
        batch.drop_column("sort_at")
