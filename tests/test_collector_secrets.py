"""Secrets never printed (issue 20): ``omis collect --validate-config``, every error line and
every log line redact the database password, the broker password and the TLS key passphrase,
wherever they were given (URL, key, environment, file)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from collector_support import database_url, postgres_server  # noqa: F401

from deploy.cli import main
from deploy.collector.config import load_collector_config
from deploy.redact import redact

SECRETS = ("S3cret-db", "S3cret/mqtt", "S3cret-tls", "S3cret-file")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text
        assert secret.replace("/", "%2F") not in text, text


def test_validate_config_prints_no_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "db.pw").write_text("S3cret-file\n")
    config = tmp_path / "collect.yaml"
    config.write_text(
        "mqtt:\n"
        "  broker: mqtts://svc.ingest:S3cret%2Fmqtt@broker.lab:8883\n"
        "  tls:\n"
        "    key_passphrase: S3cret-tls\n"
        "database:\n"
        "  password_file: " + str(tmp_path / "db.pw") + "\n"
    )
    code, text = run(["collect", "--config", str(config), "--validate-config"], capsys)
    assert code == 0, text
    assert_no_secret(text)
    shown = json.loads(text[text.index("{") :])
    assert shown["mqtt"]["broker"] == "mqtts://broker.lab:8883"  # the credentials moved out
    assert shown["mqtt"]["username"] == "svc.ingest"
    monkeypatch.setenv("OMIS_COLLECT_MQTT__PASSWORD", "S3cret/mqtt")
    url = "postgresql://omis:S3cret-db@db.lab:5432/archive"
    code, text = run(["collect", "--db", url, "--validate-config"], capsys)
    assert code == 0, text
    assert_no_secret(text)
    assert json.loads(text[text.index("{") :])["database"]["url"] == (
        "postgresql://omis@db.lab:5432/archive"
    )


def test_the_password_in_a_url_still_reaches_the_database() -> None:
    config = load_collector_config(
        environ={},
        overrides={
            "database": {"url": "postgresql://omis:S3cret-db@db.lab/archive"},
            "mqtt": {"broker": "mqtt://svc.ingest:S3cret%2Fmqtt@broker.lab:1883"},
        },
    )
    assert "S3cret-db" in config.database_url(Path("/tmp"))
    assert config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "S3cret/mqtt"
    assert "S3cret" not in repr(config) + str(config) + config.model_dump_json()
    assert (config.mqtt.broker, config.mqtt.username) == ("mqtt://broker.lab:1883", "svc.ingest")
    user_only = load_collector_config(environ={}, overrides={"mqtt": {"broker": "mqtt://svc@b"}})
    assert (user_only.mqtt.broker, user_only.mqtt.username) == ("mqtt://b", "svc")


@pytest.mark.parametrize(
    "argv",
    [
        ["--db", "postgresql://omis:S3cret-db@db.lab:notaport/archive"],
        ["--db", "postgresql://omis:S3cret-db@127.0.0.1:1/archive"],  # refused connection
        ["--db", "mysql://omis:S3cret-db@db.lab/archive"],
        ["--db", "postgresql://omis:S3cret-db@127.0.0.1:1/archive?sslmode=bogus"],
        ["--broker", "mqtt://svc:S3cret/mqtt@broker.lab:notaport"],
        ["--broker", "ftp://svc:S3cret-tls@broker.lab"],
    ],
)
def test_error_lines_and_logs_carry_no_secret(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["collect", "--state-dir", str(tmp_path), "--http", "127.0.0.1:0"]
    if "--broker" in argv:
        base += ["--db", f"sqlite:///{tmp_path / 'a.sqlite'}"]
    else:
        base += ["--broker", "mqtt://127.0.0.1:1"]
    code, text = run([*base, "-v", *argv], capsys)
    assert code != 0, text
    assert "error" in text
    assert_no_secret(text)


def test_redact_hides_url_passwords_and_known_secrets() -> None:
    assert redact("db postgresql://omis:pw@h/x failed") == "db postgresql://omis:***@h/x failed"
    assert redact("'mqtt://u:p/w@h:1'") == "'mqtt://u:***@h:1'"
    assert redact("postgresql://omis@h/x") == "postgresql://omis@h/x"
    assert redact("http://h:8080/a@b") == "http://h:8080/a@b"


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    from deploy.cli import RedactingFormatter

    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "cannot reach %s", ("postgresql://a:S3cret-db@h/d",), None
    )
    assert_no_secret(RedactingFormatter("%(message)s").format(record))
