"""Shadow results: a candidate's call on each slide beside the serving one (omis.shadow/1).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create shadow_results."""
    op.create_table(
        "shadow_results",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(64), nullable=False, unique=True),
        sa.Column("serving_message_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("slide_id", sa.String(128), nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=False),
        sa.Column("received_at", sa.DateTime, nullable=False),
        sa.Column("candidate_name", sa.String(128), nullable=False),
        sa.Column("candidate_version", sa.BigInteger, nullable=False),
        sa.Column("candidate_sha256", sa.String(64), nullable=False),
        sa.Column("serving_sha256", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("label", sa.String(64)),
        sa.Column("risk", sa.String(16)),
        sa.Column("p_high", sa.Float),
        sa.Column("serving_outcome", sa.String(16), nullable=False),
        sa.Column("serving_label", sa.String(64)),
        sa.Column("payload", sa.Text, nullable=False),
    )
    op.create_index(
        "ix_shadow_results_candidate", "shadow_results", ["candidate_sha256", "device_id"]
    )
    op.create_index("ix_shadow_results_serving", "shadow_results", ["serving_message_id"])


def downgrade() -> None:
    """Drop shadow_results."""
    op.drop_index("ix_shadow_results_serving", table_name="shadow_results")
    op.drop_index("ix_shadow_results_candidate", table_name="shadow_results")
    op.drop_table("shadow_results")
