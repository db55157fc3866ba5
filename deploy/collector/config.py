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
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy import make_url

from deploy.config import TlsConfig, _merge, _read_file, _read_secret, env_overrides
from deploy.exceptions import ConfigError
from deploy.redact import redact, register_secret
from firmware_bridge.validation import first_error

ENV_PREFIX = "OMIS_COLLECT_"
DB_FILE = "collector.sqlite"
LOCAL_HOST_NAMES = ("localhost", "127.0.0.1", "[::1]")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _credentials_out_of_url(data: Any, url_key: str, user_key: str | None) -> Any:
    """Move ``user:password@`` out of ``data[url_key]`` into the password (and user) keys.

    The URL is then safe to show anywhere; the secret lives in a SecretStr.  A password given
    both ways is an error (which one would win is a guess)."""
    if not isinstance(data, dict) or not isinstance(data.get(url_key), str):
        return data
    parts = urlsplit(data[url_key])
    moves_user = user_key is not None and bool(parts.username)
    if parts.password is None and not moves_user:
        return data
    out = dict(data)
    host = parts.netloc.rpartition("@")[2]
    if parts.password is not None:
        if data.get("password") is not None or data.get("password_file") is not None:
            raise ValueError(f"{url_key} holds a password and password/password_file is set too")
        out["password"] = unquote(parts.password)
    if user_key is not None:  # the broker URL carries no user: it moves to its own key
        if parts.username and data.get(user_key) is None:
            out[user_key] = unquote(parts.username)
        netloc = host
    else:  # a database URL keeps its user
        netloc = f"{parts.username}@{host}" if parts.username else host
    out[url_key] = urlunsplit(parts._replace(netloc=netloc))
    return out


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

    @model_validator(mode="before")
    @classmethod
    def _url_credentials(cls, data: Any) -> Any:
        return _credentials_out_of_url(data, "broker", "username")


class IngestConfig(_Section):
    """How messages become rows: batches, storage retries, receipts, the watchdog."""

    batch_max: int = Field(
        default=200, ge=1, le=10000, description="most results committed in one transaction"
    )
    storage_tries: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="tries to store one message while the database works for others; then it "
        "is set aside in the rejected table (kind storage)",
    )
    retry_min_s: float = Field(default=0.5, gt=0, description="first storage retry delay")
    retry_max_s: float = Field(default=30.0, gt=0, description="storage retry delay cap")
    receipts: bool = Field(
        default=True,
        description="confirm every stored or set-aside message_id to its device on "
        "<prefix>/<device>/receipt (the device keeps a result until then)",
    )
    watchdog_s: float = Field(
        default=5.0, gt=0, le=3600, description="how often the MQTT and writer threads are checked"
    )
    stuck_after_s: float = Field(
        default=600.0,
        gt=0,
        description="exit non-zero when a received message waits this long without the writer "
        "making progress (a stuck loop); the supervisor restarts the process",
    )


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
    command_timeout_s: float = Field(
        default=5.0,
        ge=0.1,
        le=60.0,
        description="how long POST /api/devices/{id}/scan|cancel waits for the device's reply",
    )
    auth_failures_per_minute: int = Field(
        default=10, ge=1, le=100000, description="failed authentications per client and minute"
    )
    kdf_concurrency: int = Field(
        default=2, ge=1, le=64, description="password hashes computed at once (the rest wait)"
    )
    session_ttl_s: int = Field(
        default=12 * 3600, ge=60, le=30 * 24 * 3600, description="lifetime of a login session"
    )
    secure_cookies: bool | None = Field(
        default=None,
        description="mark the session cookie Secure; None = when the request came over TLS",
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: list(LOCAL_HOST_NAMES),
        min_length=1,
        description="Host header values the API answers (DNS-rebinding defence); list the "
        "names clients use when listening on another interface; `*.lab.example` matches "
        "sub-domains; `*` turns the check off",
    )
    dashboard_broker_url: str | None = Field(
        default=None,
        pattern=r"^wss?://[^\s/?#]+(/[^\s?#]*)?$",
        description="the broker's WebSockets URL the dashboard connects to (ws:// or wss://); "
        "None = the page's own host on port 8884.  The page never takes it from its URL; the "
        "Content-Security-Policy lets it connect there and nowhere else",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        out = []
        for host in hosts:
            name = host.strip().lower()
            if ":" in name and not name.startswith("["):
                name = f"[{name}]"  # an IPv6 Host header arrives in brackets
            wildcard = name.startswith("*.") and "*" not in name[1:]
            if not name or ("*" in name and name != "*" and not wildcard):
                raise ValueError(f"{host!r}: a host name, an address, '*.domain' or '*'")
            out.append(name)
        return out


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

    @model_validator(mode="before")
    @classmethod
    def _url_credentials(cls, data: Any) -> Any:
        return _credentials_out_of_url(data, "url", None)

    @model_validator(mode="after")
    def _scheme(self) -> DatabaseConfig:
        if self.url is not None and not self.url.startswith(("sqlite:///", "postgresql")):
            raise ValueError("url must be sqlite:///PATH or postgresql://...")
        return self


class ReviewConfig(_Section):
    """The worklist (docs/collector.md)."""

    qc_sample_share: float = Field(
        default=0.10,
        ge=0.0,
        le=1.0,
        description="share of classified-low results drawn for the negative rescreen",
    )


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
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="ingest and receipts")
    high_risk_alerts: bool = Field(default=True, description="an alert for every high-risk result")
    review: ReviewConfig = Field(default_factory=ReviewConfig, description="worklist, QC sample")

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
    for secret in (mqtt.password, db.password, tls.key_passphrase):
        if secret is not None:
            register_secret(secret.get_secret_value())
    return config


def shown(config: CollectorConfig) -> str:
    """The configuration as JSON for people: secrets masked, URLs without passwords."""
    return redact(config.model_dump_json(indent=2))
