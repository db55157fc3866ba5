"""Typed configuration of the appliance: YAML file, then ``OMIS_<SECTION>__<KEY>`` overrides.

Every key has a default and a description (``docs/configuration.md`` lists them).  Unknown keys
are errors.  Secrets (MQTT password, TLS key passphrase) are read from their ``*_file`` or the
environment when the configuration is loaded, never at import time.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from deploy.exceptions import ConfigError
from firmware_bridge.limits import IDENTIFIER_HELP, IDENTIFIER_PATTERN
from firmware_bridge.validation import first_error

ENV_PREFIX = "OMIS_"
ENV_SEPARATOR = "__"
# Namespaces of other programs sharing the OMIS_ prefix: the appliance never reads them.
FOREIGN_ENV_PREFIXES = ("OMIS_COLLECT_",)


class _Section(BaseModel):
    # python-re: the shared IDENTIFIER_PATTERN ends in \Z (Rust regex lacks it)
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, validate_assignment=True, regex_engine="python-re"
    )


def _default_device_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "device"
    return f"omis-{host}"


class DeviceConfig(_Section):
    """Identity and on-device storage."""

    id: str = Field(
        default_factory=_default_device_id,
        pattern=IDENTIFIER_PATTERN,
        description=f"device id used in MQTT topics and results ({IDENTIFIER_HELP})",
    )
    state_dir: Path | None = Field(
        default=None,
        description="state directory; overridden by --state-dir, else $OMIS_STATE_DIR, "
        "else /var/lib/omis",
    )


class TlsConfig(_Section):
    """TLS towards the broker (``mqtts://`` URLs)."""

    ca_file: Path | None = Field(default=None, description="CA bundle; None = system store")
    cert_file: Path | None = Field(default=None, description="client certificate (PEM)")
    key_file: Path | None = Field(default=None, description="client private key (PEM)")
    key_passphrase: SecretStr | None = Field(
        default=None, description="passphrase of key_file (prefer key_passphrase_file)"
    )
    key_passphrase_file: Path | None = Field(
        default=None, description="file holding the key passphrase, read at load time"
    )
    insecure: bool = Field(default=False, description="skip hostname check (testing only)")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class MqttConfig(_Section):
    """The MQTT link."""

    broker: str = Field(
        default="embedded",
        description="mqtt://host:port, mqtts://host:port or embedded[:port]",
    )
    prefix: str = Field(
        default="omis/v1",
        pattern=r"^[^#+]+[^/#+]$",
        description="topic prefix; topics are <prefix>/<device>/...",
    )
    client_id: str | None = Field(default=None, description="client id; None = omis-<device>")
    protocol: Literal["mqttv5", "mqttv311"] = Field(
        default="mqttv5", description="MQTT protocol version"
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="keep-alive interval")
    username: str | None = Field(default=None, description="user name")
    password: SecretStr | None = Field(
        default=None, description="password (prefer password_file or OMIS_MQTT__PASSWORD)"
    )
    password_file: Path | None = Field(
        default=None, description="file holding the password, read at load time"
    )
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings")
    reconnect_min_s: float = Field(default=1.0, gt=0, description="first reconnect delay")
    reconnect_max_s: float = Field(default=60.0, gt=0, description="reconnect delay cap")
    max_inflight: int = Field(
        default=20, ge=1, le=1000, description="unacknowledged result publishes at once"
    )
    max_command_bytes: int = Field(
        default=16384, ge=256, description="larger command payloads are answered too_large"
    )

    @model_validator(mode="after")
    def _delays(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self


class OutboxConfig(_Section):
    """The durable result outbox (SQLite, WAL)."""

    max_rows: int = Field(default=10000, ge=1, description="results held at most")
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="payload bytes held")
    synchronous: Literal["full", "normal"] = Field(
        default="full",
        description="SQLite synchronous mode; full survives power loss, normal only crashes",
    )
    receipts: bool = Field(
        default=True,
        description="keep a result after the broker's PUBACK (state sent) until the archive's "
        "receipt on <prefix>/<device>/receipt; false = delete at PUBACK (no archive)",
    )
    receipt_timeout_s: float = Field(
        default=300.0,
        ge=1,
        le=7 * 24 * 3600,
        description="publish a sent result again when no receipt came within this time",
    )


PLAN_NAME = r"^[A-Za-z0-9._-]{1,64}$"


class PlanConfig(_Section):
    """A field layout: how many fields, in which pattern, how far apart."""

    pattern: Literal["grid", "serpentine"] = Field(
        default="serpentine", description="row by row left to right (grid) or boustrophedon"
    )
    fields: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="fields per slide; None = the command's fields, else scan.fields",
    )
    step_um: tuple[float, float] = Field(
        default=(800.0, 800.0), description="distance between neighbouring fields (x, y), µm"
    )
    columns: int | None = Field(
        default=None, ge=1, description="fields per row; None = ceil(sqrt(fields))"
    )

    @model_validator(mode="after")
    def _positive_step(self) -> PlanConfig:
        if min(self.step_um) <= 0:
            raise ValueError("step_um must be positive")
        return self


def _default_plans() -> dict[str, PlanConfig]:
    return {"default": PlanConfig()}


class ScanConfig(_Section):
    """Scanning."""

    microscope: str = Field(default="sim://", description="microscope URL (sim://, serial://, ...)")
    bundle: Path | None = Field(
        default=None,
        description="model bundle; None = the model store's active model (models/state.json)",
    )
    fields: int = Field(default=8, ge=1, le=1000, description="fields per slide by default")
    plan: str = Field(
        default="default", pattern=PLAN_NAME, description="name of the plan (scan.plans) by default"
    )
    plans: dict[str, PlanConfig] = Field(
        default_factory=_default_plans,
        description="field layouts by name; cmd/scan's plan names one of them",
    )
    min_usable_fields: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="a slide with fewer fields passing quality control is abstained "
        "(insufficient_fields) and goes to a person: one field is too little of a slide to call",
    )
    queue_size: int = Field(default=8, ge=1, le=1000, description="scans waiting at most")
    scan_on_insert: bool = Field(
        default=True, description="start a scan when the firmware reports a slide inserted"
    )
    shutdown_grace_s: float = Field(
        default=20.0,
        ge=0,
        description="on SIGTERM the running slide may finish within this time, else it is "
        "abandoned (no result)",
    )
    connect_retry_initial_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="a microscope missing at start is retried after this, then twice as long "
        "each time (the device is degraded meanwhile)",
    )
    connect_retry_max_s: float = Field(
        default=60.0, gt=0, le=3600, description="the longest wait between microscope retries"
    )

    @model_validator(mode="after")
    def _known_plan(self) -> ScanConfig:
        bad = [name for name in self.plans if not re.fullmatch(PLAN_NAME, name)]
        if bad:
            raise ValueError(f"plan name {bad[0]!r} must match {PLAN_NAME}")
        if self.plan not in self.plans:
            raise ValueError(f"plan {self.plan!r} is not in scan.plans ({', '.join(self.plans)})")
        return self


class ServiceConfig(_Section):
    """Supervision and health."""

    health_interval_s: float = Field(default=5.0, gt=0, description="health file refresh")
    metrics_interval_s: float = Field(default=60.0, gt=0, description="metrics publish period")
    restart_max: int = Field(default=5, ge=0, description="worker restarts allowed per window")
    restart_window_s: float = Field(default=300.0, gt=0, description="restart-rate window")


class OtaConfig(_Section):
    """Over-the-air model updates taken by ``omis serve`` (docs/ota.md)."""

    health_slides: int = Field(
        default=3, ge=1, le=1000, description="commit after this many good slides in a row"
    )
    health_seconds: float = Field(
        default=600.0,
        gt=0,
        description="... or after this many seconds (monotonic) of passing checks, no failure",
    )
    health_check_interval_s: float = Field(
        default=30.0, gt=0, description="application health checks during the health period"
    )
    health_significance: float = Field(
        default=0.01,
        gt=0.0,
        lt=0.5,
        description=(
            "level of the health period's exact binomial tests: the update rolls back when its "
            "referral (or, if it changed QC, no-usable-field) rate is significantly above the "
            "rate its bundle was validated at"
        ),
    )
    need_after_s: float = Field(
        default=5.0, gt=0, description="inline transfer: ask again for missing chunks after this"
    )
    transfer_timeout_s: float = Field(
        default=300.0, gt=0, description="inline transfer: no chunk for this long refuses the offer"
    )
    fetch_timeout_s: float = Field(
        default=60.0, gt=0, description="HTTPS bundle download socket timeout"
    )


class InferenceConfig(_Section):
    """How the device path runs the model (the model contract itself comes from the bundle).

    The same rules as ``omis infer``: a backend or precision asked for by name that cannot run
    here is an error at start-up, never a silent switch to another one.
    """

    backend: Literal["auto", "tensorrt", "onnxruntime", "torch"] = Field(
        default="auto",
        description="inference backend; auto = TensorRT when usable, else ONNX Runtime",
    )
    precision: Literal["fp16", "fp32"] | None = Field(
        default=None,
        description="engine precision; None = the backend's own default (a backend that cannot "
        "run the precision asked for refuses to start)",
    )
    spectrum_backend: Literal["auto", "numpy", "cuda"] = Field(
        default="auto", description="spectrum backend; auto = CUDA when usable, else numpy"
    )
    max_batch: int = Field(default=8, ge=1, le=1024, description="largest batch an engine takes")
    opt_batch: int = Field(
        default=1, ge=1, le=1024, description="batch size TensorRT optimises the engine for"
    )
    ort_provider: Literal["cpu", "cuda", "tensorrt"] = Field(
        default="cpu", description="onnxruntime execution provider (onnxruntime backend only)"
    )
    device: Literal["cpu", "cuda"] = Field(
        default="cpu", description="where the torch backend runs (torch backend only)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> InferenceConfig:
        if self.opt_batch > self.max_batch:
            raise ValueError("opt_batch must be <= max_batch")
        if self.ort_provider != "cpu" and self.backend != "onnxruntime":
            raise ValueError(f"ort_provider {self.ort_provider} needs backend onnxruntime")
        if self.device != "cpu" and self.backend != "torch":
            raise ValueError(f"device {self.device} needs backend torch")
        return self


class AppConfig(_Section):
    """The whole configuration file."""

    device: DeviceConfig = Field(default_factory=DeviceConfig, description="identity")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="MQTT link")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="result outbox")
    scan: ScanConfig = Field(default_factory=ScanConfig, description="scanning")
    service: ServiceConfig = Field(default_factory=ServiceConfig, description="supervision")
    ota: OtaConfig = Field(default_factory=OtaConfig, description="model updates")
    inference: InferenceConfig = Field(
        default_factory=InferenceConfig, description="inference and spectrum backends"
    )


def _set_path(tree: dict[str, Any], keys: list[str], value: Any, var: str) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{var}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``OMIS_<SECTION>__<KEY>[__<SUBKEY>]`` variables as a nested mapping.

    Values are parsed as YAML scalars, so ``true``, ``5`` and ``1.5`` get their types.
    """
    tree: dict[str, Any] = {}
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or ENV_SEPARATOR not in var:
            continue
        if var.startswith(FOREIGN_ENV_PREFIXES):
            continue  # another program's namespace (omis collect), never the appliance's
        keys = [k.lower() for k in var[len(ENV_PREFIX) :].split(ENV_SEPARATOR)]
        if any(not k for k in keys):
            raise ConfigError(f"{var}: empty key in environment override")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict | list):
            value = raw  # only scalars come from the environment
        _set_path(tree, keys, value, var)
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_secret(path: Path, key: str) -> SecretStr:
    try:
        return SecretStr(path.read_text("utf-8").strip())
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read secret file {path}: {exc.strerror}") from exc


def _load_secrets(config: AppConfig) -> None:
    mqtt = config.mqtt
    if mqtt.password is None and mqtt.password_file is not None:
        mqtt.password = _read_secret(mqtt.password_file, "mqtt.password_file")
    tls = mqtt.tls
    if tls.key_passphrase is None and tls.key_passphrase_file is not None:
        tls.key_passphrase = _read_secret(tls.key_passphrase_file, "mqtt.tls.key_passphrase_file")


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AppConfig:
    """Load the file (if any), apply environment then explicit overrides, read secrets."""
    data = _read_file(Path(path)) if path is not None else {}
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    try:
        config = AppConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(first_error(exc)) from exc
    _load_secrets(config)
    return config
