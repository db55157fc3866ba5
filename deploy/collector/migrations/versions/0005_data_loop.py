"""The data loop: the slide index of ``reviews`` (revision 0004) and study metadata per slide.

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


def upgrade() -> None:
    """The slide index of ``reviews`` (made by revision 0004) and ``study_slides``."""
    op.create_index("ix_reviews_slide", "reviews", ["slide_id", "id"])
    op.create_table(
        "study_slides",
        sa.Column("slide_id", sa.String(128), primary_key=True),
        sa.Column("patient_id", sa.String(128)),
        sa.Column("site", sa.String(128)),
        sa.Column("reference", sa.String(16)),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    """Drop ``study_slides`` and the slide index (``reviews`` belongs to revision 0004)."""
    op.drop_table("study_slides")
    op.drop_index("ix_reviews_slide", table_name="reviews")
