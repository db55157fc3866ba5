"""The archive's tables (SQLAlchemy Core).  Changes go through a new Alembic migration.

Times are stored as naive UTC (``DateTime`` without zone) so SQLite and PostgreSQL compare
them the same way; the API writes them out as RFC 3339 with ``Z``.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# BigInteger ids on PostgreSQL, INTEGER (the rowid alias) on SQLite.
_Id = BigInteger().with_variant(Integer(), "sqlite")

results = Table(
    "results",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False, unique=True),
    Column("device_id", String(64), nullable=False),
    Column("boot_id", String(128), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("slide_id", String(128), nullable=False),
    Column("scan_id", String(128), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=False),
    Column("received_at", DateTime, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("outcome_reason", Text),
    Column("outcome_stage", String(64)),
    Column("review", Boolean, nullable=False),
    Column("label", String(64)),
    Column("risk", String(16)),
    Column("p_high", Float),
    Column("model_name", String(128)),
    Column("model_version", BigInteger),
    Column("model_sha256", String(64)),
    Column("payload", Text, nullable=False),
    Index("ix_results_finished", "finished_at"),
    Index("ix_results_device_finished", "device_id", "finished_at"),
    Index("ix_results_slide", "slide_id"),
    Index("ix_results_boot_seq", "device_id", "boot_id", "seq"),
)

devices = Table(
    "devices",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("availability", String(16)),
    Column("availability_at", DateTime),
    Column("status", Text),
    Column("status_at", String(40)),
    Column("ota_state", Text),
    Column("last_result_at", DateTime),
    Column("updated_at", DateTime, nullable=False),
)

boots = Table(
    "boots",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("boot_id", String(128), primary_key=True),
    Column("max_seq", BigInteger, nullable=False),
    Column("first_seen", DateTime, nullable=False),
)

alerts = Table(
    "alerts",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("key", String(300), nullable=False, unique=True),
    Column("kind", String(32), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("boot_id", String(128)),
    Column("message_id", String(64)),
    Column("seq_from", BigInteger),
    Column("seq_to", BigInteger),
    Column("detail", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("resolved_at", DateTime),
    Index("ix_alerts_open", "resolved_at", "created_at"),
    Index("ix_alerts_device", "device_id", "created_at"),
)

# A person's verdict on a result (sign-out); amendments are new rows, the latest row of a
# message_id is its current verdict.  Same definition as the review branch's (docs/collector.md).
reviews = Table(
    "reviews",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False),
    Column("slide_id", String(128), nullable=False),
    Column("bethesda", String(32)),
    Column("adequacy", String(32), nullable=False),
    Column("comment", Text),
    Column("user_name", String(64), nullable=False),
    Column("role", String(64), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("supersedes", BigInteger),
    Index("ix_reviews_message", "message_id", "id"),
)
# The data loop reads verdicts per slide (dataset export): its own index, added by 0005.
Index("ix_reviews_slide", reviews.c.slide_id, reviews.c.id)

# Study metadata of a slide that the device does not know: patient, site, reference standard.
study_slides = Table(
    "study_slides",
    metadata,
    Column("slide_id", String(128), primary_key=True),
    Column("patient_id", String(128)),
    Column("site", String(128)),
    Column("reference", String(16)),
    Column("updated_at", DateTime, nullable=False),
)
