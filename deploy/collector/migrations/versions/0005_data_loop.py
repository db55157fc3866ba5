"""The data loop: reviews (verdicts) and study metadata per slide.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """``reviews`` unless revision 0004 (review and sign-out) made it already, its slide index,
    and ``study_slides``."""
    if not sa.inspect(op.get_bind()).has_table("reviews"):
        _create_reviews()
    op.create_index("ix_reviews_slide", "reviews", ["slide_id", "id"])
    op.create_table(
        "study_slides",
        sa.Column("slide_id", sa.String(128), primary_key=True),
        sa.Column("patient_id", sa.String(128)),
        sa.Column("site", sa.String(128)),
        sa.Column("reference", sa.String(16)),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )


def _create_reviews() -> None:
    # exactly revision 0004's definition (deploy/collector/tables.py)
    op.create_table(
        "reviews",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("slide_id", sa.String(128), nullable=False),
        sa.Column("bethesda", sa.String(32)),
        sa.Column("adequacy", sa.String(32), nullable=False),
        sa.Column("comment", sa.Text),
        sa.Column("user_name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("supersedes", sa.BigInteger),
    )
    op.create_index("ix_reviews_message", "reviews", ["message_id", "id"])


def downgrade() -> None:
    """Drop ``study_slides`` and the slide index (``reviews`` belongs to revision 0004)."""
    op.drop_table("study_slides")
    op.drop_index("ix_reviews_slide", table_name="reviews")
