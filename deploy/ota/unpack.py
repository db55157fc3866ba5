"""Safe unpacking and packing of ``.tar`` bundles.

A bundle archive comes from the network, so every member is checked before anything is
written: only regular files and directories, relative names without ``..``, no duplicates,
and caps on the member count, each file's size and the total size.  Extraction then goes
through Python's ``tarfile`` ``"data"`` filter as a second line of defence.  The archive may
hold the bundle files at its root or inside one top-level directory.

Verify before you expand (:func:`verified_extract`): ``manifest.json`` and ``manifest.sig`` are
read from the archive first (small, in memory) and the signature checked; only then is each
payload file streamed to disk, refused unless the signed manifest lists it, cut off at its
signed size and its sha256 compared as it is written.  A small unsigned ``.tar.gz`` that
would expand to gigabytes writes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from deploy.ota.exceptions import SignatureInvalidError, UnsafeArchiveError
from inference.bundle import MANIFEST, SIGNATURE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnpackLimits:
    """Caps on what an archive may contain."""

    max_members: int = 256
    max_file_bytes: int = 2 << 30
    max_total_bytes: int = 4 << 30
    max_manifest_bytes: int = 1 << 20


# (manifest bytes, signature bytes) -> {file name: (size, sha256)} of the signed manifest;
# raises when the signature does not verify or the manifest is invalid.
ManifestVerifier = Callable[[bytes, bytes], Mapping[str, tuple[int, str]]]
_CHUNK = 1 << 20


def is_archive(path: Path) -> bool:
    """True when ``path`` is a regular file that ``tarfile`` recognises."""
    return path.is_file() and tarfile.is_tarfile(path)


def _check_name(name: str) -> str:
    if not name or "\x00" in name or "\\" in name:
        raise UnsafeArchiveError(f"archive member {name!r}: bad name")
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        raise UnsafeArchiveError(f"archive member {name!r}: absolute path")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r}: path traversal ('..')")
    return "/".join(parts)


def _check_member(member: tarfile.TarInfo, seen: set[str], limits: UnpackLimits) -> str:
    name = _check_name(member.name)
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"archive member {member.name!r}: links are not allowed")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(f"archive member {member.name!r}: not a regular file or directory")
    if member.size > limits.max_file_bytes:
        raise UnsafeArchiveError(
            f"archive member {member.name!r}: {member.size} bytes exceeds the "
            f"{limits.max_file_bytes}-byte cap"
        )
    if name and name in seen:
        raise UnsafeArchiveError(f"archive member {member.name!r}: duplicate name")
    seen.add(name)
    return name


def _checked_members(tf: tarfile.TarFile, limits: UnpackLimits) -> list[tarfile.TarInfo]:
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    total = 0
    while (member := tf.next()) is not None:
        if len(members) >= limits.max_members:
            raise UnsafeArchiveError(f"archive has more than {limits.max_members} members")
        _check_member(member, seen, limits)
        total += member.size
        if total > limits.max_total_bytes:
            raise UnsafeArchiveError(
                f"archive content exceeds the {limits.max_total_bytes}-byte cap"
            )
        members.append(member)
    return members


def _bundle_root(dest: Path) -> Path:
    if (dest / MANIFEST).is_file():
        return dest
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MANIFEST).is_file():
        return entries[0]
    raise UnsafeArchiveError(f"archive holds no {MANIFEST} at its root or in one top directory")


def safe_extract(archive: Path, dest: Path, limits: UnpackLimits | None = None) -> Path:
    """Check and extract ``archive`` into the empty directory ``dest``; returns the bundle root.

    Raises :class:`UnsafeArchiveError` (and may leave partial files in ``dest``, which the
    caller owns and removes) on any unsafe member, cap overrun or truncated archive.
    """
    limits = limits or UnpackLimits()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, mode="r:*") as tf:
            members = _checked_members(tf, limits)
            for member in members:
                tf.extract(member, path=dest, filter="data")
    except tarfile.FilterError as exc:
        raise UnsafeArchiveError(f"{archive.name}: unsafe member refused ({exc})") from exc
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise UnsafeArchiveError(f"{archive.name}: broken or truncated archive ({exc})") from exc
    log.debug("extracted %d member(s) of %s", len(members), archive)
    return _bundle_root(dest)


def _read_small(tf: tarfile.TarFile, member: tarfile.TarInfo, cap: int) -> bytes:
    if member.size > cap:
        raise UnsafeArchiveError(f"archive member {member.name!r}: {member.size} bytes > {cap}")
    fh = tf.extractfile(member)
    if fh is None:
        raise UnsafeArchiveError(f"archive member {member.name!r}: not a regular file")
    return fh.read(cap + 1)


def read_signed_pair(archive: Path, limits: UnpackLimits | None = None) -> tuple[bytes, bytes]:
    """(manifest bytes, signature bytes) of an archive, read in memory; nothing is unpacked."""
    try:
        _, manifest, signature = _signed_pair(archive, limits or UnpackLimits())
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise UnsafeArchiveError(f"{archive.name}: broken or truncated archive ({exc})") from exc
    return manifest, signature


def _signed_pair(archive: Path, limits: UnpackLimits) -> tuple[str, bytes, bytes]:
    """(top-level prefix, manifest bytes, signature bytes), reading nothing else to disk."""
    found: dict[str, tuple[str, bytes]] = {}
    seen: set[str] = set()
    with tarfile.open(archive, mode="r:*") as tf:
        for count, member in enumerate(iter(tf.next, None), start=1):
            if count > limits.max_members:
                raise UnsafeArchiveError(f"archive has more than {limits.max_members} members")
            name = _check_member(member, seen, limits)
            prefix, _, leaf = name.rpartition("/")
            if member.isreg() and leaf in (MANIFEST, SIGNATURE) and "/" not in prefix:
                data = _read_small(tf, member, limits.max_manifest_bytes)
                found[leaf] = (prefix + "/" if prefix else "", data)
            if len(found) == 2:
                break
    if MANIFEST not in found:
        raise UnsafeArchiveError(f"archive holds no {MANIFEST} at its root or in one top directory")
    if SIGNATURE not in found:
        raise SignatureInvalidError(f"{archive.name}: unsigned bundle (no {SIGNATURE})")
    (prefix, manifest), (sig_prefix, signature) = found[MANIFEST], found[SIGNATURE]
    if prefix != sig_prefix:
        raise UnsafeArchiveError(f"{MANIFEST} and {SIGNATURE} are in different directories")
    return prefix, manifest, signature


def _stream(src: IO[bytes], target: Path, name: str, size: int, sha256: str) -> None:
    digest = hashlib.sha256()
    written = 0
    with target.open("xb") as out:
        while chunk := src.read(min(_CHUNK, size - written + 1)):
            written += len(chunk)
            if written > size:
                raise UnsafeArchiveError(f"{name}: longer than its signed size ({size} bytes)")
            digest.update(chunk)
            out.write(chunk)
    if written != size or digest.hexdigest() != sha256:
        raise UnsafeArchiveError(f"{name}: size or sha256 differs from the signed manifest")


def _expand_member(
    tf: tarfile.TarFile,
    member: tarfile.TarInfo,
    rel: str,
    dest: Path,
    signed: Mapping[str, tuple[int, str]],
) -> None:
    if member.isdir():
        (dest / rel).mkdir(parents=True, exist_ok=True)
        return
    if rel not in signed:
        raise UnsafeArchiveError(f"archive member {member.name!r}: not listed in the manifest")
    size, sha256 = signed[rel]
    if member.size != size:
        raise UnsafeArchiveError(
            f"archive member {member.name!r}: {member.size} bytes, the manifest signs {size}"
        )
    src = tf.extractfile(member)
    if src is None:
        raise UnsafeArchiveError(f"archive member {member.name!r}: not a regular file")
    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
    _stream(src, dest / rel, member.name, size, sha256)


def verified_extract(
    archive: Path, dest: Path, verify: ManifestVerifier, limits: UnpackLimits | None = None
) -> Path:
    """Verify the signed manifest of ``archive``, then extract only what it signs into ``dest``.

    Returns the bundle root (``dest``).  Raises :class:`UnsafeArchiveError` or the verifier's
    error; on failure ``dest`` may hold checked files only, never more bytes than the signed
    sizes (the caller owns and removes it).
    """
    limits = limits or UnpackLimits()
    try:
        prefix, manifest, signature = _signed_pair(archive, limits)
        signed = dict(verify(manifest, signature))
        signed[MANIFEST] = (len(manifest), hashlib.sha256(manifest).hexdigest())
        signed[SIGNATURE] = (len(signature), hashlib.sha256(signature).hexdigest())
        dest.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        with tarfile.open(archive, mode="r:*") as tf:
            for count, member in enumerate(iter(tf.next, None), start=1):
                if count > limits.max_members:
                    raise UnsafeArchiveError(f"archive has more than {limits.max_members} members")
                name = _check_member(member, seen, limits)
                if prefix and name == prefix.rstrip("/") and member.isdir():
                    continue
                if not name.startswith(prefix):
                    raise UnsafeArchiveError(f"archive member {member.name!r}: outside {prefix}")
                _expand_member(tf, member, name[len(prefix) :], dest, signed)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise UnsafeArchiveError(f"{archive.name}: broken or truncated archive ({exc})") from exc
    missing = sorted(name for name in signed if not (dest / name).is_file())
    if missing:
        raise UnsafeArchiveError(f"archive lacks signed file(s): {', '.join(missing)}")
    return dest


def _add_tree(tf: tarfile.TarFile, root: Path) -> None:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise UnsafeArchiveError(f"{rel}: only regular files and directories can be packed")
        info = tf.gettarinfo(str(path), arcname=rel)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0  # reproducible archives: the same bundle packs to the same bytes
        if path.is_file():
            with path.open("rb") as fh:
                tf.addfile(info, fh)
        else:
            tf.addfile(info)


def pack_bundle(bundle_dir: Path, archive: Path) -> Path:
    """Write ``bundle_dir`` as an uncompressed tar (files at its root), atomically."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{archive.name}.", suffix=".tmp", dir=archive.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tf:
                _add_tree(tf, bundle_dir)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, archive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return archive


def copy_tree_checked(src: Path, dest: Path, limits: UnpackLimits | None = None) -> Path:
    """Copy a bundle directory into the new directory ``dest`` under the archive rules.

    Links, devices and FIFOs are refused before anything is read from them; the same member
    count and size caps apply as for archives.  Returns ``dest``.
    """
    limits = limits or UnpackLimits()
    entries = sorted(src.rglob("*"))
    if len(entries) > limits.max_members:
        raise UnsafeArchiveError(f"{src}: more than {limits.max_members} entries")
    total = 0
    dest.mkdir(parents=True)
    for path in entries:
        rel = path.relative_to(src)
        if path.is_symlink():
            raise UnsafeArchiveError(f"{rel}: links are not allowed in a bundle")
        if path.is_dir():
            (dest / rel).mkdir(exist_ok=True)
            continue
        if not path.is_file():
            raise UnsafeArchiveError(f"{rel}: not a regular file or directory")
        size = path.stat().st_size
        total += size
        if size > limits.max_file_bytes or total > limits.max_total_bytes:
            raise UnsafeArchiveError(f"{rel}: bundle exceeds the size cap")
        shutil.copyfile(path, dest / rel)
    return dest
