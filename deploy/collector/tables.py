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
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
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
    # finished_at bounded by received_at + the allowed skew (lists order by it; 0003)
    Column("sort_at", DateTime, nullable=False),
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
    # HMAC of message_id as a number in [0, 1): the reproducible QC draw (review.py)
    Column("qc_rank", Float),
    Index("ix_results_finished", "finished_at"),
    Index("ix_results_device_finished", "device_id", "finished_at"),
    Index("ix_results_slide", "slide_id"),
    Index("ix_results_boot_seq", "device_id", "boot_id", "seq"),
    Index("ix_results_sort", "sort_at"),
    Index("ix_results_device_sort", "device_id", "sort_at"),
)

devices = Table(
    "devices",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("availability", String(16)),
    Column("availability_at", DateTime),
    Column("status", Text),
    Column("status_at", String(40)),  # the status's own "at", as the device sent it
    # ... parsed and bounded by the archive's clock: a newer status replaces an older one (0003)
    Column("status_time", DateTime),
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
    Column("slide_id", String(128)),
    Column("acked_at", DateTime),
    Column("acked_by", String(64)),
    Column("count", Integer, nullable=False, server_default="1"),
    Index("ix_alerts_open", "resolved_at", "created_at"),
    Index("ix_alerts_device", "device_id", "created_at"),
)

# Messages the archive could not accept: the bytes exactly as received, never dropped
# (docs/collector.md, "Failure classes").  ``kind``: data, storage or conflict.
rejected = Table(
    "rejected",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("received_at", DateTime, nullable=False),
    Column("topic", Text, nullable=False),
    Column("device_id", String(64)),
    Column("message_id", String(64)),
    Column("kind", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Index("ix_rejected_received", "received_at"),
    Index("ix_rejected_device", "device_id", "received_at"),
)

users = Table(
    "users",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("disabled", Boolean, nullable=False, server_default=false()),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("user_name", String(64), nullable=False),
    Column("digest", String(64), nullable=False, unique=True),  # sha256 of the token
    Column("label", String(64)),
    Column("created_at", DateTime, nullable=False),
    Column("revoked_at", DateTime),
)

sessions = Table(
    "sessions",
    metadata,
    Column("digest", String(64), primary_key=True),  # sha256 of the cookie value
    Column("user_name", String(64), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False),
    Index("ix_sessions_user", "user_name"),
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

claims = Table(
    "claims",
    metadata,
    Column("message_id", String(64), primary_key=True),
    Column("user_name", String(64), nullable=False),
    Column("assigned_by", String(64), nullable=False),
    Column("claimed_at", DateTime, nullable=False),
)

audit = Table(
    "audit",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("at", DateTime, nullable=False),
    Column("user_name", String(64), nullable=False),
    Column("role", String(16)),
    Column("action", String(32), nullable=False),
    Column("target", String(300)),
    Column("detail", Text, nullable=False),
    Column("client", String(64)),
    Index("ix_audit_at", "at"),
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

# Fleet (deploy/fleet): device groups, staged rollouts and each device's step in them.
device_groups = Table(
    "device_groups",
    metadata,
    Column("group_name", String(64), primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("added_at", DateTime, nullable=False),
)

rollouts = Table(
    "rollouts",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("bundle_sha256", String(64), nullable=False),
    Column("bundle_name", String(128), nullable=False),
    Column("bundle_version", BigInteger, nullable=False),
    Column("target", Text, nullable=False),  # JSON: {"devices": [...]} or {"group": G, ...}
    Column("canary", Integer, nullable=False),
    Column("wave_size", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # running | halted | completed
    Column("reason", Text),
    # The bundle's sha256 while the rollout runs, else NULL: one running rollout per bundle.
    Column("active_key", String(64), unique=True),
    Column("owner", String(200)),  # host:pid of the command driving it
    Column("heartbeat_at", DateTime),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Index("ix_rollouts_bundle", "bundle_sha256", "created_at"),
)

rollout_devices = Table(
    "rollout_devices",
    metadata,
    Column("rollout_id", _Id, primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("wave", Integer, nullable=False),
    Column("step", String(16), nullable=False),
    Column("version", BigInteger),
    Column("detail", Text),
    Column("updated_at", DateTime, nullable=False),
)

# What each device's retained ota/state reported as the end of an install (one row per offer
# and final step): the fleet view counts rollbacks from it.
ota_events = Table(
    "ota_events",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("correlation_id", String(128), nullable=False),
    Column("step", String(16), nullable=False),
    Column("version", BigInteger),
    Column("reason", Text),
    Column("at", DateTime, nullable=False),
    UniqueConstraint("device_id", "correlation_id", "step", name="uq_ota_events_offer_step"),
    Index("ix_ota_events_device", "device_id", "at"),
)

# A shadow candidate's call on one slide (omis.shadow/1), beside the serving result it names.
# Never part of the worklist, alerts or FHIR: only GET /api/shadow reads it.
shadow_results = Table(
    "shadow_results",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False, unique=True),
    Column("serving_message_id", String(64), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("slide_id", String(128), nullable=False),
    Column("finished_at", DateTime, nullable=False),
    Column("received_at", DateTime, nullable=False),
    Column("candidate_name", String(128), nullable=False),
    Column("candidate_version", BigInteger, nullable=False),
    Column("candidate_sha256", String(64), nullable=False),
    Column("serving_sha256", String(64), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("reason", Text),
    Column("label", String(64)),
    Column("risk", String(16)),
    Column("p_high", Float),
    Column("serving_outcome", String(16), nullable=False),
    Column("serving_label", String(64)),
    Column("payload", Text, nullable=False),
    Index("ix_shadow_results_candidate", "candidate_sha256", "device_id"),
    Index("ix_shadow_results_serving", "serving_message_id"),
)
