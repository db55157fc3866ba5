"""People, review and sign-out: users, tokens, sessions, reviews, claims, audit; alert acks.

Adds ``results.qc_rank`` (the reproducible QC draw, back-filled here) and the alert columns
``slide_id``, ``acked_at``, ``acked_by``, ``count``.

Revision ID: 0004
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0001"
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _people() -> None:
    op.create_table(
        "users",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("user_name", sa.String(64), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("label", sa.String(64)),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("revoked_at", sa.DateTime),
    )
    op.create_table(
        "sessions",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("user_name", sa.String(64), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_sessions_user", "sessions", ["user_name"])


def _work() -> None:
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
    op.create_table(
        "claims",
        sa.Column("message_id", sa.String(64), primary_key=True),
        sa.Column("user_name", sa.String(64), nullable=False),
        sa.Column("assigned_by", sa.String(64), nullable=False),
        sa.Column("claimed_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "audit",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("user_name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16)),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(300)),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("client", sa.String(64)),
    )
    op.create_index("ix_audit_at", "audit", ["at"])


def _backfill_qc_rank() -> None:
    from deploy.collector.qcsample import qc_rank  # the one definition of the draw

    conn = op.get_bind()
    results = sa.table(
        "results", sa.column("id", sa.BigInteger), sa.column("message_id"), sa.column("qc_rank")
    )
    rows = conn.execute(sa.select(results.c.id, results.c.message_id)).all()
    for row in rows:
        conn.execute(
            sa.update(results).where(results.c.id == row.id).values(qc_rank=qc_rank(row.message_id))
        )


def upgrade() -> None:
    """New tables; new columns on results and alerts (nullable or defaulted: no table rewrite)."""
    _people()
    _work()
    op.add_column("results", sa.Column("qc_rank", sa.Float))
    op.add_column("alerts", sa.Column("slide_id", sa.String(128)))
    op.add_column("alerts", sa.Column("acked_at", sa.DateTime))
    op.add_column("alerts", sa.Column("acked_by", sa.String(64)))
    op.add_column("alerts", sa.Column("count", sa.Integer, nullable=False, server_default="1"))
    _backfill_qc_rank()


def downgrade() -> None:
    """Drop what upgrade added."""
    for column in ("count", "acked_by", "acked_at", "slide_id"):
        op.drop_column("alerts", column)
    op.drop_column("results", "qc_rank")
    for table in ("audit", "claims", "reviews", "sessions", "api_tokens", "users"):
        op.drop_table(table)
