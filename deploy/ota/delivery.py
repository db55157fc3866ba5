"""Getting a bundle to the device: the ``cmd/ota`` offer, chunked MQTT transfer, HTTPS download.

An offer carries the exact manifest bytes and their signature (base64), so the device refuses
an untrusted, old or incompatible bundle *before* it downloads anything.  The bundle itself
then comes from a local path, an HTTPS URL (TLS verified, size-capped) or inline in chunks::

    <prefix>/<device>/ota/chunk/<transfer-id>/<index>   raw bytes, QoS 1 (sender -> device)
    <prefix>/<device>/ota/need/<transfer-id>            {"missing": [i, ...]} (device -> sender)

Received chunks are kept on disk (one file each), so a transfer resumes after a restart; the
device asks for what it lacks.  Everything here is transport-free and unit-testable; the MQTT
client lives in the daemon (device side: :mod:`deploy.appliance.ota_transfer`) and in
``omis ota publish`` (sender side: :mod:`deploy.ota.sender`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import shutil
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploy.messages.ota_state import OtaStateMessage
from deploy.ota.exceptions import DeliveryError, RejectedError, SignatureInvalidError
from deploy.ota.install import check_candidate
from deploy.ota.signing import SignedManifest, opened, read_pair, verify_manifest
from deploy.ota.store import ModelStore
from deploy.ota.trust import TrustStore
from deploy.ota.unpack import is_archive, read_signed_pair
from firmware_bridge.exceptions import InputError
from firmware_bridge.fsutil import atomic_write_bytes
from firmware_bridge.limits import IDENTIFIER_HELP, is_identifier
from firmware_bridge.paths import safe_join
from firmware_bridge.validation import first_error
from inference.bundle import MANIFEST, SIGNATURE, sha256_file

log = logging.getLogger(__name__)

OFFER_SCHEMA = "omis.ota_offer/1"
DEFAULT_CHUNK = 256 * 1024
MAX_BUNDLE_BYTES = 2 << 30
TRANSFER_ID = r"^[A-Za-z0-9_-]{8,64}$"
SHA256 = r"^[0-9a-f]{64}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class PathSource(_Model):
    """The bundle is already on the device (directory or .tar)."""

    kind: Literal["path"] = "path"
    path: str = Field(min_length=1, description="absolute path on the device")


class UrlSource(_Model):
    """Download the .tar over HTTPS."""

    kind: Literal["url"] = "url"
    url: str = Field(pattern=r"^https://\S+$", description="HTTPS only; TLS is verified")
    size: int = Field(ge=1, description="exact byte size of the archive")
    sha256: str = Field(pattern=SHA256, description="sha256 of the archive")


class InlineSource(_Model):
    """The .tar follows in chunks over MQTT."""

    kind: Literal["inline"] = "inline"
    transfer_id: str = Field(pattern=TRANSFER_ID, description="names the chunk topics")
    size: int = Field(ge=1, description="exact byte size of the archive")
    sha256: str = Field(pattern=SHA256, description="sha256 of the archive")
    chunk_size: int = Field(ge=1024, le=8 << 20, description="bytes per chunk (last may be short)")

    @property
    def chunks(self) -> int:
        """Number of chunks."""
        return -(-self.size // self.chunk_size)


Source = Annotated[PathSource | UrlSource | InlineSource, Field(discriminator="kind")]


class OtaOffer(_Model):
    """Payload of ``cmd/ota``."""

    schema_: Literal["omis.ota_offer/1"] = Field("omis.ota_offer/1", alias="schema")
    correlation_id: str = Field(min_length=1, max_length=128)
    device_id: str | None = Field(None, max_length=128, description="target device, if named")
    manifest: str = Field(description="base64 of the exact manifest.json bytes")
    signature: str = Field(description="base64 of manifest.sig")
    source: Source

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, populate_by_name=True
    )

    def manifest_bytes(self) -> bytes:
        """Decoded manifest bytes."""
        return _b64(self.manifest, "manifest")

    def signature_bytes(self) -> bytes:
        """Decoded signature bytes."""
        return _b64(self.signature, "signature")

    def to_json(self) -> bytes:
        """Wire form."""
        return self.model_dump_json(by_alias=True).encode()


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DeliveryError(f"offer: {what} is not valid base64") from exc


def parse_offer(payload: bytes) -> OtaOffer:
    """Validate a ``cmd/ota`` payload; the error names the offending key."""
    try:
        return OtaOffer.model_validate_json(payload)
    except ValidationError as exc:
        raise DeliveryError(f"offer: {first_error(exc, 'offer')}") from exc


def make_offer(bundle: Path, source: PathSource | UrlSource | InlineSource, cid: str) -> OtaOffer:
    """Build the offer for a signed bundle directory or .tar."""
    with opened(bundle) as root:
        manifest = (root / MANIFEST).read_bytes()
        sig_path = root / SIGNATURE
        if not sig_path.is_file():
            raise DeliveryError(f"{bundle}: unsigned bundle (run 'omis bundle sign' first)")
        signature = sig_path.read_bytes()
    return OtaOffer(
        correlation_id=cid,
        manifest=base64.b64encode(manifest).decode(),
        signature=base64.b64encode(signature).decode(),
        source=source,
    )


def precheck_offer(
    offer: OtaOffer, trust: TrustStore, store: ModelStore, app_version: str
) -> SignedManifest:
    """Refuse an offer before any download: signature, manifest, anti-rollback, app version.

    Remote offers never allow a downgrade; a replayed old offer fails here.  This is the one
    signature check and the one manifest parse of the offer: the installer compares the
    delivered bundle's bytes with the returned :class:`SignedManifest`.
    """
    if not is_identifier(offer.correlation_id):
        # It names the received archive: refuse it before anything is downloaded.
        raise DeliveryError(
            f"offer: correlation_id {offer.correlation_id!r} is not a valid id ({IDENTIFIER_HELP})"
        )
    try:
        signed = verify_manifest(offer.manifest_bytes(), offer.signature_bytes(), trust.keys())
    except RejectedError as exc:
        if isinstance(exc, SignatureInvalidError):
            raise
        raise DeliveryError(f"offer manifest: {exc}") from exc
    check_candidate(signed.manifest, store.read_state().current, app_version, False)
    size = getattr(offer.source, "size", 0)
    if size > MAX_BUNDLE_BYTES:
        raise DeliveryError(f"offer: bundle of {size} bytes exceeds the {MAX_BUNDLE_BYTES} cap")
    return signed


def check_matches_offer(bundle: Path, offer: OtaOffer) -> None:
    """The delivered bundle must carry exactly the offered manifest and signature.

    Reads the two small files (from an archive: in memory); nothing is unpacked or verified
    here, the installer's one verified unpack compares the same bytes again.
    """
    try:
        if bundle.is_dir():
            data, signature = read_pair(bundle)
        elif is_archive(bundle):
            data, signature = read_signed_pair(bundle)
        else:
            raise DeliveryError(f"{bundle}: neither a bundle directory nor a tar archive")
    except (RejectedError, OSError) as exc:
        raise DeliveryError(f"delivered bundle: {exc}") from exc
    if data != offer.manifest_bytes() or signature != offer.signature_bytes():
        raise DeliveryError("delivered bundle's manifest differs from the offer")


# -- topics -------------------------------------------------------------------------------------


def chunk_topic(prefix: str, device: str, transfer_id: str, index: int) -> str:
    """Topic of one chunk."""
    return f"{prefix}/{device}/ota/chunk/{transfer_id}/{index}"


def need_topic(prefix: str, device: str, transfer_id: str) -> str:
    """Topic on which the device lists missing chunks."""
    return f"{prefix}/{device}/ota/need/{transfer_id}"


_CHUNK_RE = re.compile(r"/ota/chunk/([A-Za-z0-9_-]{8,64})/(\d{1,9})$")


def parse_chunk_topic(topic: str) -> tuple[str, int]:
    """(transfer id, index) of a chunk topic."""
    m = _CHUNK_RE.search(topic)
    if m is None:
        raise DeliveryError(f"not a chunk topic: {topic}")
    return m.group(1), int(m.group(2))


def iter_chunks(archive: Path, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    """(index, bytes) of an archive, in order."""
    with archive.open("rb") as fh:
        index = 0
        while block := fh.read(chunk_size):
            yield index, block
            index += 1


def inline_source(archive: Path, transfer_id: str, chunk_size: int = DEFAULT_CHUNK) -> InlineSource:
    """The inline source describing ``archive``."""
    return InlineSource(
        transfer_id=transfer_id,
        size=archive.stat().st_size,
        sha256=sha256_file(archive),
        chunk_size=chunk_size,
    )


class ChunkAssembler:
    """Collects the chunks of one transfer on disk under ``work_dir`` (resumable)."""

    def __init__(self, work_dir: Path, source: InlineSource) -> None:
        self.source = source
        try:
            self.dir = safe_join(Path(work_dir), source.transfer_id, what="transfer_id")
        except InputError as exc:
            raise DeliveryError(str(exc)) from exc

    def _expected_len(self, index: int) -> int:
        s = self.source
        return s.chunk_size if index < s.chunks - 1 else s.size - s.chunk_size * (s.chunks - 1)

    def add(self, index: int, data: bytes) -> None:
        """Store chunk ``index`` (idempotent: a resent chunk replaces the same bytes)."""
        if not 0 <= index < self.source.chunks:
            raise DeliveryError(f"chunk {index} out of range (0..{self.source.chunks - 1})")
        if len(data) != self._expected_len(index):
            raise DeliveryError(
                f"chunk {index}: {len(data)} bytes, expected {self._expected_len(index)}"
            )
        atomic_write_bytes(self.dir / f"{index:09d}", data)

    def received(self) -> set[int]:
        """Indices on disk with the right length."""
        if not self.dir.is_dir():
            return set()
        got = set()
        for path in self.dir.iterdir():
            if path.name.isdigit() and int(path.name) < self.source.chunks:
                index = int(path.name)
                if path.stat().st_size == self._expected_len(index):
                    got.add(index)
        return got

    def missing(self) -> list[int]:
        """Indices still to receive, in order."""
        have = self.received()
        return [i for i in range(self.source.chunks) if i not in have]

    def need_payload(self, limit: int = 1024) -> bytes:
        """``{"missing": [...]}`` for the need topic (at most ``limit`` indices)."""
        return json.dumps({"missing": self.missing()[:limit]}, allow_nan=False).encode()

    def assemble(self, out: Path) -> Path:
        """Concatenate into ``out`` (atomically), checking size and sha256; then drop chunks."""
        if missing := self.missing():
            raise DeliveryError(f"transfer incomplete: {len(missing)} chunk(s) missing")
        h = hashlib.sha256()
        tmp = out.with_name(f".{out.name}.partial")
        with tmp.open("wb") as fh:
            for i in range(self.source.chunks):
                block = (self.dir / f"{i:09d}").read_bytes()
                h.update(block)
                fh.write(block)
        if h.hexdigest() != self.source.sha256:
            tmp.unlink()
            self.discard()
            raise DeliveryError("transfer corrupt: sha256 differs from the offer; chunks dropped")
        tmp.replace(out)
        self.discard()
        return out

    def discard(self) -> None:
        """Remove the received chunks."""
        shutil.rmtree(self.dir, ignore_errors=True)


# -- HTTPS download -------------------------------------------------------------------------------


def fetch_url(
    source: UrlSource, out: Path, timeout: float = 30.0, context: ssl.SSLContext | None = None
) -> Path:
    """Download ``source`` to ``out`` with TLS verification, the offered size as a hard cap,
    and a sha256 check; nothing is left at ``out`` on failure."""
    if not source.url.startswith("https://"):
        raise DeliveryError("only https:// URLs are accepted")
    ctx = context or ssl.create_default_context()
    tmp = out.with_name(f".{out.name}.partial")
    h = hashlib.sha256()
    got = 0
    try:
        # The scheme is checked to be https above (S310).
        resp_cm = urllib.request.urlopen(source.url, timeout=timeout, context=ctx)  # noqa: S310
        with resp_cm as resp, tmp.open("wb") as fh:
            while block := resp.read(1 << 20):
                got += len(block)
                if got > source.size:
                    raise DeliveryError(f"download exceeds the offered {source.size} bytes")
                h.update(block)
                fh.write(block)
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise DeliveryError(f"download of {source.url} failed: {exc}") from exc
    except DeliveryError:
        tmp.unlink(missing_ok=True)
        raise
    if got != source.size or h.hexdigest() != source.sha256:
        tmp.unlink(missing_ok=True)
        raise DeliveryError("download differs from the offer (size or sha256)")
    tmp.replace(out)
    return out


# -- ota/state ----------------------------------------------------------------------------------


def archive_path(work_dir: Path, offer: OtaOffer) -> Path:
    """Where the archive of ``offer`` is received: named by its (validated) correlation id,
    never outside ``work_dir``."""
    try:
        return safe_join(work_dir, offer.correlation_id, ".tar", what="offer: correlation_id")
    except InputError as exc:
        raise DeliveryError(str(exc)) from exc


def ota_state_payload(store: ModelStore, progress: dict[str, Any] | None = None) -> dict[str, Any]:
    """The retained ``ota/state`` payload: store state plus the running install's progress."""
    payload = store.state()
    payload["progress"] = progress
    return OtaStateMessage.model_validate(payload).to_json()  # the one model of ota/state
