"""Ed25519 keys and bundle signatures.

``manifest.sig`` holds the raw 64-byte Ed25519 signature of the exact bytes of
``manifest.json``.  The manifest lists the sha256 and size of every other file, so one
signature covers the whole bundle; :func:`verify_bundle` checks both the signature and every
file hash.  Keys are PEM files: the private key (PKCS#8, mode 0600) and the public key beside
it with a ``.pub`` suffix.  A key's fingerprint is the hex sha256 of its raw 32 public bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from deploy.ota.exceptions import RejectedError, SignatureInvalidError, TrustError
from deploy.ota.unpack import (
    ManifestVerifier,
    UnpackLimits,
    is_archive,
    pack_bundle,
    safe_extract,
    verified_extract,
)
from firmware_bridge.exceptions import InputError
from firmware_bridge.fsutil import atomic_write_bytes
from firmware_bridge.paths import safe_join
from inference.bundle import (
    MANIFEST,
    SIGNATURE,
    Bundle,
    Manifest,
    load_bundle,
    parse_manifest,
    verify_files,
)
from inference.exceptions import BundleError

log = logging.getLogger(__name__)

SIGNATURE_BYTES = 64
DEFAULT_KEY_NAME = "omis-bundle"
PUB_SUFFIX = ".pub"


@dataclass(frozen=True)
class KeyPair:
    """Paths and fingerprint of a freshly generated key pair."""

    private: Path
    public: Path
    fingerprint: str


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose files and signature have been verified."""

    bundle: Bundle
    signer: str

    def describe(self) -> dict[str, object]:
        """Name, version, model sha256 and signer fingerprint."""
        return {**self.bundle.describe(), "signer": self.signer}


def fingerprint(key: Ed25519PublicKey) -> str:
    """Hex sha256 of the raw public key bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_pem(key: Ed25519PublicKey) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def generate_keypair(out_dir: Path, name: str = DEFAULT_KEY_NAME) -> KeyPair:
    """Write ``out_dir/name`` (private, 0600) and ``out_dir/name.pub``; never overwrites."""
    try:
        private_path = safe_join(out_dir, name, what="key name")
        public_path = safe_join(out_dir, name, PUB_SUFFIX, what="key name")
    except InputError as exc:
        raise TrustError(str(exc)) from exc
    for path in (private_path, public_path):
        if path.exists():
            raise TrustError(f"{path} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    written: list[Path] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(private_path, pem)  # mkstemp creates the file with mode 0600
        written.append(private_path)
        os.chmod(private_path, 0o600)
        atomic_write_bytes(public_path, public_pem(key.public_key()))
        written.append(public_path)
        os.chmod(public_path, 0o644)
    except OSError as exc:
        for path in written:  # never leave half a key pair behind
            path.unlink(missing_ok=True)
        raise TrustError(f"{out_dir}: cannot write the key pair: {exc.strerror}") from exc
    return KeyPair(private_path, public_path, fingerprint(key.public_key()))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise TrustError(f"{path}: cannot read private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM Ed25519 public key."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise TrustError(f"{path}: cannot read public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise TrustError(f"{path}: not an Ed25519 public key")
    return key


def verify_signature(data: bytes, signature: bytes, keys: Mapping[str, Ed25519PublicKey]) -> str:
    """Return the fingerprint of the trusted key that signed ``data``, else raise."""
    if not keys:
        raise SignatureInvalidError("no trusted keys: add one with 'omis ota trust KEY.pub'")
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureInvalidError(
            f"{SIGNATURE}: malformed ({len(signature)} bytes, need {SIGNATURE_BYTES})"
        )
    for fp, key in keys.items():
        try:
            key.verify(signature, data)
        except InvalidSignature:
            continue
        return fp
    raise SignatureInvalidError(
        f"{SIGNATURE} verifies against none of the {len(keys)} trusted key(s) "
        "(unknown signer, or manifest/signature altered)"
    )


def load_checked(root: Path) -> Bundle:
    """:func:`inference.bundle.load_bundle` with its errors as :class:`RejectedError`."""
    try:
        return load_bundle(root)
    except BundleError as exc:
        raise RejectedError(str(exc)) from exc


@dataclass(frozen=True)
class SignedManifest:
    """Manifest bytes whose signature verified against a trusted key, parsed once.

    Everything after the check reuses this: the unpacker compares bytes against it (no second
    signature check), the installer builds its :class:`Bundle` from ``manifest`` (no second
    parse).
    """

    data: bytes
    signature: bytes
    signer: str
    manifest: Manifest

    def files(self) -> dict[str, tuple[int, str]]:
        """{name: (size, sha256)} of every signed payload file."""
        return {name: (e.size, e.sha256) for name, e in self.manifest.files.items()}

    def bundle(self, root: Path) -> Bundle:
        """The bundle at ``root`` (whose files the caller checked against :meth:`files`)."""
        return Bundle(root=root, manifest=self.manifest, manifest_bytes=self.data)


def verify_manifest(
    data: bytes, signature: bytes, keys: Mapping[str, Ed25519PublicKey]
) -> SignedManifest:
    """Check the signature of manifest bytes, then parse them (never an untrusted parse)."""
    signer = verify_signature(data, signature, keys)
    try:
        manifest = parse_manifest(data)
    except BundleError as exc:
        raise RejectedError(str(exc)) from exc
    return SignedManifest(data, signature, signer, manifest)


def same_manifest(signed: SignedManifest, data: bytes, signature: bytes) -> None:
    """Raise unless ``data``/``signature`` are exactly the bytes ``signed`` verified."""
    if data != signed.data:
        raise RejectedError("the bundle's manifest differs from the verified (offered) one")
    if signature != signed.signature:
        raise RejectedError(f"the bundle's {SIGNATURE} differs from the verified (offered) one")


def read_pair(root: Path) -> tuple[bytes, bytes]:
    """(manifest bytes, signature bytes) of a bundle directory."""
    sig_path = root / SIGNATURE
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise RejectedError(f"{root}: no {MANIFEST}")
    if not sig_path.is_file():
        raise SignatureInvalidError(f"{root}: unsigned bundle (no {SIGNATURE})")
    return manifest_path.read_bytes(), sig_path.read_bytes()


def verify_dir(
    root: Path,
    keys: Mapping[str, Ed25519PublicKey],
    signed: SignedManifest | None = None,
) -> VerifiedBundle:
    """Verify the signature of the manifest bytes, then parse it and check every file hash.

    The signature comes first so no untrusted manifest is parsed or acted upon.  With
    ``signed`` (verified earlier, e.g. from the offer) the bytes are compared instead.
    """
    data, signature = read_pair(root)
    if signed is None:
        signed = verify_manifest(data, signature, keys)
    else:
        same_manifest(signed, data, signature)
    try:
        verify_files(root, signed.manifest)
    except BundleError as exc:
        raise RejectedError(str(exc)) from exc
    return VerifiedBundle(signed.bundle(root), signed.signer)


def manifest_verifier(
    keys: Mapping[str, Ed25519PublicKey], found: list[SignedManifest] | None = None
) -> ManifestVerifier:
    """Check a manifest's signature against ``keys``, then parse it: the signed file sizes and
    hashes, for :func:`deploy.ota.unpack.verified_extract` (verify before you expand).

    The verified manifest is appended to ``found`` when given, so the caller need not parse it
    again.
    """

    def verify(manifest: bytes, signature: bytes) -> dict[str, tuple[int, str]]:
        signed = verify_manifest(manifest, signature, keys)
        if found is not None:
            found.append(signed)
        return signed.files()

    return verify


def expected_verifier(signed: SignedManifest) -> ManifestVerifier:
    """A verifier for an archive whose manifest was verified already (the offer's): its bytes
    must be exactly those; no second signature check, no second parse."""

    def verify(manifest: bytes, signature: bytes) -> dict[str, tuple[int, str]]:
        same_manifest(signed, manifest, signature)
        return signed.files()

    return verify


@contextlib.contextmanager
def opened(
    path: Path,
    limits: UnpackLimits | None = None,
    keys: Mapping[str, Ed25519PublicKey] | None = None,
) -> Iterator[Path]:
    """Yield a bundle directory for ``path``: itself, or a temporary unpacking of a .tar.

    With ``keys`` an archive's signed manifest is verified before anything is expanded.
    """
    if path.is_dir():
        yield path
        return
    if not is_archive(path):
        raise RejectedError(f"{path}: neither a bundle directory nor a tar archive")
    with tempfile.TemporaryDirectory(prefix="omis-bundle-") as tmp:
        if keys is None:
            yield safe_extract(path, Path(tmp) / "b", limits)
        else:
            yield verified_extract(path, Path(tmp) / "b", manifest_verifier(keys), limits)


def verify_bundle(path: Path, keys: Mapping[str, Ed25519PublicKey]) -> dict[str, object]:
    """Verify a bundle directory or .tar (files and signature); returns its description."""
    with opened(path, keys=keys) as root:
        return verify_dir(root, keys).describe()


def _sign_dir(root: Path, key: Ed25519PrivateKey) -> str:
    bundle = load_checked(root)  # never sign a bundle whose files disagree with its manifest
    atomic_write_bytes(root / SIGNATURE, key.sign(bundle.manifest_bytes))
    return fingerprint(key.public_key())


def pack_dir(bundle_dir: Path, archive: Path) -> dict[str, object]:
    """``omis bundle pack``: write a valid bundle directory as the ``.tar`` that ``omis ota
    install`` and ``omis ota publish`` take (atomically; reproducible bytes).

    Refuses, with one line and without touching ``archive``, a path that is not a directory or
    whose manifest and files disagree.  Returns the bundle's description and whether it is
    signed.
    """
    if not bundle_dir.is_dir():
        raise RejectedError(f"{bundle_dir}: not a bundle directory")
    bundle = load_checked(bundle_dir)
    signature = bundle_dir / SIGNATURE
    if signature.is_file() and signature.stat().st_size != SIGNATURE_BYTES:
        raise SignatureInvalidError(f"{signature}: malformed (not {SIGNATURE_BYTES} bytes)")
    pack_bundle(bundle_dir, archive)
    log.info("packed %s into %s", bundle_dir, archive)
    return {**bundle.describe(), "archive": str(archive), "signed": signature.is_file()}


def sign_bundle(path: Path, key_path: Path) -> str:
    """Write ``manifest.sig`` into a bundle directory or .tar; returns the signer fingerprint."""
    key = load_private_key(key_path)
    if path.is_dir():
        fp = _sign_dir(path, key)
    else:
        with opened(path) as root:
            fp = _sign_dir(root, key)
            pack_bundle(root, path)
    log.info("signed %s with key %s", path, fp[:16])
    return fp


__all__ = [
    "KeyPair",
    "SignedManifest",
    "VerifiedBundle",
    "expected_verifier",
    "fingerprint",
    "generate_keypair",
    "load_checked",
    "load_private_key",
    "load_public_key",
    "opened",
    "pack_dir",
    "sign_bundle",
    "verify_bundle",
    "verify_dir",
    "verify_manifest",
    "verify_signature",
]
