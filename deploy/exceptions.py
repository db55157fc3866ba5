"""Errors raised by the appliance: configuration, outbox, MQTT, embedded broker and scanning.

Tree::

    DeployError
    ├── ConfigError             a configuration file, key or secret is invalid (names the key)
    ├── SchemaError             a payload does not match its shipped JSON Schema
    ├── OutboxError             the on-disk result outbox cannot be opened or written
    │   └── OutboxFullError     the outbox reached its row or byte bound; scans are refused
    ├── BrokerError             the embedded broker cannot start, or a broker URL is invalid
    ├── MqttError               the MQTT link cannot be configured or connected
    ├── ScanError               a scan cannot be set up or failed (no model, bad microscope URL)
    │   ├── ScanRejectedError   a scan request was refused (queue full, outbox full, stopping)
    │   ├── ScanCancelledError  a scan was cancelled before it produced a result
    │   └── InvalidResultError  the model's outputs make no valid result (NaN, out of range)
    ├── ServiceError            the daemon cannot start or a worker exceeded its restart cap
    ├── ArchiveError            the result archive (omis collect) cannot open, migrate or write
    ├── MessageRejectedError    a message the archive cannot accept (a data error): set aside
    └── FleetError              a rollout or device group cannot be created, resumed or run

Foreign errors (``sqlite3.Error``, ``OSError``, ``pydantic.ValidationError``) are wrapped at the
seam with ``raise ... from``.
"""

from __future__ import annotations


class DeployError(Exception):
    """Base of every error raised by :mod:`deploy`."""


class ConfigError(DeployError, ValueError):
    """Invalid configuration: the message names the offending key."""


class SchemaError(DeployError, ValueError):
    """A payload does not validate against its JSON Schema."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class OutboxError(DeployError):
    """The result outbox could not be opened, read or written."""


class OutboxFullError(OutboxError):
    """The outbox is at its bound; nothing is dropped, new results are refused instead."""


class BrokerError(DeployError):
    """The embedded broker could not start, or a broker URL is malformed."""


class MqttError(DeployError):
    """The MQTT client could not be configured or connected."""


class ScanError(DeployError):
    """A scan could not be set up or failed."""


class ScanRejectedError(ScanError):
    """A scan request was refused; ``code`` is the reply error code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class ScanCancelledError(ScanError):
    """A scan was cancelled (by command or shutdown) before it produced a result."""


class ServiceError(DeployError):
    """The daemon could not start, or a worker failed more often than its restart cap allows."""


class InvalidResultError(ScanError):
    """The model's outputs make no valid result (non-finite or out-of-range probabilities):
    the slide ends ``failed`` in stage ``infer``, never with a label."""

    stage = "infer"


class ArchiveError(DeployError):
    """The result archive's database cannot be opened, migrated or written."""


class MessageRejectedError(DeployError, ValueError):
    """A message the archive cannot accept (a *data* error: malformed, or a value neither
    database can store).  It is set aside in the ``rejected`` table and acknowledged, never
    retried; the message names the offending field."""


class FleetError(DeployError):
    """A rollout or device group cannot be created, resumed or run (names the cause)."""
