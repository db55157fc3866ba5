"""A development / test copy of the production broker: certificates, passwords, config.

For tests and development only: it writes a throw-away CA, a server certificate for
``localhost``/``127.0.0.1`` and client certificates (unencrypted private keys, mode 0600)
into an output directory, creates the password files with ``mosquitto_passwd -b``, copies the
ACL files and renders ``deploy/mosquitto/mosquitto.conf`` with the paths and ports of that
directory.  Production certificates come from your own PKI (docs/deploy.md, "Broker").

Usage::

    python deploy/mosquitto/dev_broker.py --out /tmp/omis-broker \\
        --device scope-01:devpass --user dashboard:dashpass --user operator:oppass
    mosquitto -c /tmp/omis-broker/mosquitto.conf

Tests import :func:`build_dev_broker` from this file (it is not part of the wheel).
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "mosquitto.conf"
ACL_FILES = ("devices.acl", "users.acl")
PROD_ETC = "/etc/mosquitto/omis/"
PROD_DATA = "/var/lib/mosquitto/"
DEVICE_PORT = 8883
DASHBOARD_PORT = 8884
MOSQUITTO_PASSWD = "mosquitto_passwd"  # noqa: S105 - the name of a binary
_VALID_DAYS = 7
_LISTENER = re.compile(r"^listener\s+(\d+)\b.*$")


class DevBrokerError(Exception):
    """The development broker tree could not be written."""


@dataclass(frozen=True)
class ClientCert:
    """A client certificate and its unencrypted key (PEM files)."""

    name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class DevBroker:
    """Where :func:`build_dev_broker` put everything."""

    root: Path
    config: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    ports: Mapping[int, int]
    clients: Mapping[str, ClientCert] = field(default_factory=dict)

    @property
    def device_port(self) -> int:
        """The port of the device listener (production 8883)."""
        return self.ports[DEVICE_PORT]

    @property
    def dashboard_port(self) -> int:
        """The port of the WebSockets listener (production 8884)."""
        return self.ports[DASHBOARD_PORT]


# ---------------------------------------------------------------------------------- PKI ----


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "omis-edge development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    # Back-dated an hour: a skewed test clock must not make the certificate "not yet valid".
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder("omis-edge dev CA", _name("omis-edge dev CA"), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(out / "ca.key", key)
    _write_cert(out / "ca.crt", cert)
    return key, cert


def _issue(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    subject: str,
    server: bool,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(subject, ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        san = x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        builder = builder.add_extension(san, critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def generate_pki(out: Path, clients: Sequence[str]) -> dict[str, ClientCert]:
    """CA, server certificate (localhost, 127.0.0.1) and one client certificate per name."""
    ca = _make_ca(out)
    key, cert = _issue(ca, "localhost", server=True)
    _write_key(out / "server.key", key)
    _write_cert(out / "server.crt", cert)
    made: dict[str, ClientCert] = {}
    certs = out / "clients"
    certs.mkdir(exist_ok=True)
    for name in clients:
        key, cert = _issue(ca, name, server=False)
        made[name] = ClientCert(name, certs / f"{name}.crt", certs / f"{name}.key")
        _write_key(made[name].key, key)
        _write_cert(made[name].cert, cert)
    return made


# --------------------------------------------------------------------------- passwords ----


def write_password_file(path: Path, accounts: Mapping[str, str]) -> None:
    """Create ``path`` with ``mosquitto_passwd -b`` (hashed; an empty file for no accounts)."""
    binary = shutil.which(MOSQUITTO_PASSWD)
    if binary is None:
        raise DevBrokerError("mosquitto_passwd not found (apt-get install mosquitto)")
    path.write_text("", "utf-8")
    path.chmod(0o600)
    for user, password in accounts.items():
        if ":" in user or not user:
            raise DevBrokerError(f"invalid MQTT user name {user!r}")
        done = subprocess.run(
            [binary, "-b", str(path), user, password], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise DevBrokerError(f"mosquitto_passwd failed for {user}: {done.stderr.strip()}")


# ------------------------------------------------------------------------------ config ----


def render_config(
    template: str, root: Path, ports: Mapping[int, int], bind: str, run_as: str | None = None
) -> str:
    """The production configuration with paths under ``root`` and listeners on ``ports``.

    Every production listener port must be mapped; each listener is bound to ``bind``.
    ``run_as`` adds a ``user`` line: a broker started as root otherwise switches to the
    ``mosquitto`` user before it reads the password files, which a private test directory
    does not let it read.
    """
    lines = [f"user {run_as}"] if run_as else []
    for original in template.splitlines():
        line = original
        match = _LISTENER.match(line)
        if match:
            port = int(match.group(1))
            if port not in ports:
                raise DevBrokerError(f"no port given for production listener {port}")
            line = f"listener {ports[port]} {bind}"
        line = line.replace(PROD_ETC, f"{root}/").replace(PROD_DATA, f"{root / 'data'}/")
        lines.append(line)
    return "\n".join(lines) + "\n"


def build_dev_broker(
    out: Path,
    devices: Mapping[str, str],
    users: Mapping[str, str],
    ports: Mapping[int, int],
    *,
    bind: str = "127.0.0.1",
    services: Mapping[str, str] | None = None,
) -> DevBroker:
    """Write a complete broker tree into ``out`` (created; must be empty or absent).

    ``devices`` and ``services`` get a client certificate whose CN is their name (the device
    listener takes the identity from it and ignores passwords, so theirs are not written);
    ``users`` (dashboard/operator accounts, name -> password) go to ``users.passwd``.
    """
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise DevBrokerError(f"{out} is not empty")
    (out / "data").mkdir()
    device_accounts = {**devices, **(services or {})}
    clients = generate_pki(out, list(device_accounts))
    write_password_file(out / "users.passwd", users)
    for name in ACL_FILES:
        shutil.copyfile(HERE / name, out / name)
    config = out / "mosquitto.conf"
    text = render_config(TEMPLATE.read_text("utf-8"), out, ports, bind, getpass.getuser())
    config.write_text(text, "utf-8")
    return DevBroker(
        root=out,
        config=config,
        ca_cert=out / "ca.crt",
        server_cert=out / "server.crt",
        server_key=out / "server.key",
        ports=dict(ports),
        clients=clients,
    )


# --------------------------------------------------------------------------------- CLI ----


def _pairs(values: Sequence[str] | None, what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values or ():
        name, sep, password = value.partition(":")
        if not sep or not name or not password:
            raise DevBrokerError(f"--{what} {value!r}: expected NAME:PASSWORD")
        pairs[name] = password
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the tree and print how to start mosquitto with it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, type=Path, help="new or empty directory")
    parser.add_argument("--device", action="append", help="DEVICE_ID:PASSWORD (repeatable)")
    parser.add_argument("--service", action="append", help="svc.NAME:PASSWORD (repeatable)")
    parser.add_argument("--user", action="append", help="dashboard/operator NAME:PASSWORD")
    parser.add_argument("--device-port", type=int, default=DEVICE_PORT)
    parser.add_argument("--dashboard-port", type=int, default=DASHBOARD_PORT)
    parser.add_argument("--bind", default="127.0.0.1", help="listen address")
    args = parser.parse_args(argv)
    try:
        broker = build_dev_broker(
            args.out,
            devices=_pairs(args.device, "device"),
            users=_pairs(args.user, "user"),
            services=_pairs(args.service, "service"),
            ports={DEVICE_PORT: args.device_port, DASHBOARD_PORT: args.dashboard_port},
            bind=args.bind,
        )
    except (DevBrokerError, OSError) as exc:
        sys.stderr.write(f"dev_broker: {exc}\n")
        return 1
    sys.stdout.write(f"mosquitto -c {broker.config}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
