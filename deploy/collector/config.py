"""Typed configuration of ``omis collect``: YAML file, ``OMIS_COLLECT_<SECTION>__<KEY>``, flags.

Same conventions as the appliance's :mod:`deploy.config`: unknown keys are errors, every key has
a default and a description, secrets come from ``*_file`` keys or the environment at load time.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from sqlalchemy import make_url

from deploy.config import TlsConfig, _merge, _read_file, _read_secret, env_overrides
from deploy.exceptions import ConfigError
from firmware_bridge.validation import first_error

ENV_PREFIX = "OMIS_COLLECT_"
DB_FILE = "collector.sqlite"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _default_client_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"
    return f"omis-collect-{host}"


class CollectorMqtt(_Section):
    """The MQTT side: a persistent MQTT 5 session with a shared subscription."""

    broker: str = Field(
        default="mqtt://127.0.0.1:1883", description="mqtt://host:port or mqtts://host:port"
    )
    prefix: str = Field(
        default="omis/v1", pattern=r"^[^#+$]+[^/#+]$", description="topic prefix to archive"
    )
    client_id: str = Field(
        default_factory=_default_client_id,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="client id: the broker keeps this instance's session under it, so it must "
        "be stable across restarts and different for every instance",
    )
    group: str = Field(
        default="omis-archive",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="shared-subscription group ($share/<group>/...): instances of one group "
        "split the results",
    )
    session_expiry_s: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        le=0xFFFFFFFE,
        description="the broker keeps the session (and queues results) this long while the "
        "instance is away",
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="keep-alive interval")
    username: str | None = Field(default=None, description="user name (svc.ingest in the ACLs)")
    password: SecretStr | None = Field(
        default=None, description="password (prefer password_file or the environment)"
    )
    password_file: Path | None = Field(default=None, description="file holding the password")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings (mqtts://)")
    reconnect_min_s: float = Field(default=1.0, gt=0, description="first reconnect delay")
    reconnect_max_s: float = Field(default=30.0, gt=0, description="reconnect delay cap")


class Account(_Section):
    """An HTTP API account (roles as the broker's dashboard accounts)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$", description="user name")
    role: Literal["viewer", "operator"] = Field(
        default="viewer", description="viewer reads; operator may also send scan/cancel"
    )
    password_hash: str = Field(
        description="scrypt hash from `omis collect --hash-password` (never the password)"
    )


class HttpConfig(_Section):
    """The HTTP API."""

    host: str = Field(default="127.0.0.1", description="listen address")
    port: int = Field(default=8080, ge=0, le=65535, description="listen port (0 = any free)")
    accounts: list[Account] = Field(
        default_factory=list,
        description="accounts; requests from other hosts than localhost must authenticate",
    )
    require_auth_on_localhost: bool = Field(
        default=False, description="also require an account for requests from 127.0.0.1/::1"
    )
    dashboard_dir: Path | None = Field(
        default=None,
        description="serve these static files at / (default: the packaged deploy/dashboard "
        "when its node_modules are installed)",
    )
    max_page: int = Field(default=1000, ge=1, le=100000, description="largest page of results")


class DatabaseConfig(_Section):
    """Where the archive lives."""

    url: str | None = Field(
        default=None,
        description="sqlite:///PATH or postgresql://user@host[:port]/db; None = "
        f"sqlite under the state directory ({DB_FILE})",
    )
    password_file: Path | None = Field(
        default=None, description="file holding the database password, read at load time"
    )
    password: SecretStr | None = Field(
        default=None, description="database password (prefer password_file)"
    )

    @model_validator(mode="after")
    def _scheme(self) -> DatabaseConfig:
        if self.url is not None and not self.url.startswith(("sqlite:///", "postgresql")):
            raise ValueError("url must be sqlite:///PATH or postgresql://...")
        return self


class PerformanceConfig(_Section):
    """Performance in service and its alerts (``GET /api/performance``, docs/collector.md)."""

    bundles: list[Path] = Field(
        default_factory=list,
        description="bundle directories (or their manifest.json) whose validated figures and "
        "reference distribution the service data are compared with",
    )
    alpha: float = Field(
        default=0.01, gt=0.0, lt=0.5, description="level of the one-sided exact binomial test"
    )
    min_n: int = Field(default=20, ge=1, description="fewest slides before an alert may fire")
    psi_limit: float = Field(default=0.25, gt=0.0, description="p(high) drift limit (PSI)")
    centroid_limit_sd: float = Field(
        default=1.0, gt=0.0, description="spectral centroid shift limit, in training SDs"
    )
    check_interval_s: float = Field(
        default=300.0, ge=1.0, description="how often the alerts are re-evaluated"
    )


class CollectorConfig(_Section):
    """The whole ``omis collect`` configuration."""

    performance: PerformanceConfig = Field(
        default_factory=PerformanceConfig, description="performance monitoring and its alerts"
    )

    mqtt: CollectorMqtt = Field(default_factory=CollectorMqtt, description="MQTT session")
    database: DatabaseConfig = Field(default_factory=DatabaseConfig, description="storage")
    http: HttpConfig = Field(default_factory=HttpConfig, description="HTTP API")
    high_risk_alerts: bool = Field(default=True, description="an alert for every high-risk result")

    @model_validator(mode="after")
    def _check(self) -> CollectorConfig:
        if self.mqtt.reconnect_max_s < self.mqtt.reconnect_min_s:
            raise ValueError("mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s")
        return self

    def database_url(self, state_dir: Path) -> str:
        """``database.url`` (with its password), else ``sqlite:///<state_dir>/collector.sqlite``."""
        db = self.database
        if db.url is None:
            return f"sqlite:///{state_dir / DB_FILE}"
        if db.password is None:
            return db.url
        url = make_url(db.url).set(password=db.password.get_secret_value())
        return url.render_as_string(hide_password=False)


def load_collector_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> CollectorConfig:
    """Load the file (if any), then ``OMIS_COLLECT_*`` variables, then ``overrides``."""
    data = _read_file(Path(path)) if path is not None else {}
    env = os.environ if environ is None else environ
    scoped = {f"OMIS_{k[len(ENV_PREFIX) :]}": v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    data = _merge(data, env_overrides(scoped))
    if overrides:
        data = _merge(data, overrides)
    try:
        config = CollectorConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(first_error(exc)) from exc
    mqtt = config.mqtt
    if mqtt.password is None and mqtt.password_file is not None:
        mqtt.password = _read_secret(mqtt.password_file, "mqtt.password_file")
    db = config.database
    if db.password is None and db.password_file is not None:
        db.password = _read_secret(db.password_file, "database.password_file")
    tls = mqtt.tls
    if tls.key_passphrase is None and tls.key_passphrase_file is not None:
        tls.key_passphrase = _read_secret(tls.key_passphrase_file, "mqtt.tls.key_passphrase_file")
    return config
