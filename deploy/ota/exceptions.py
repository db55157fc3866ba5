"""Errors raised by over-the-air model updates (children of :class:`deploy.exceptions.DeployError`).

Tree::

    DeployError
    └── OtaError                  base of every OTA error
        ├── RejectedError         a bundle or offer failed a check; nothing was changed
        │   ├── UnsafeArchiveError  a .tar is unsafe or broken (traversal, link, size, truncated)
        │   ├── SignatureInvalidError  no trusted key verifies the manifest signature
        │   ├── DowngradeError      version not greater than the current one (or a replay)
        │   ├── IncompatibleError   min_app_version is newer than this application
        │   └── ModelCheckError     the engine did not build/load or failed the golden gate
        ├── HealthCheckError      the switched model failed its health period (rolled back)
        ├── StoreError            the model store cannot do this (locked, nothing to roll back)
        ├── TrustError            a key cannot be added, found or removed
        └── DeliveryError         an offer, chunk or download is invalid or incomplete

Foreign errors (``OSError``, ``tarfile.TarError``, ``cryptography`` errors, inference's
``BundleError``) are wrapped at the seam with ``raise ... from``.
"""

from __future__ import annotations

from deploy.exceptions import DeployError


class OtaError(DeployError):
    """Base of every error raised by :mod:`deploy.ota`."""


class RejectedError(OtaError):
    """A bundle or offer failed a check before anything changed; the message says which."""


class UnsafeArchiveError(RejectedError):
    """A bundle archive is unsafe (traversal, absolute path, link, device, too big) or broken."""


class SignatureInvalidError(RejectedError):
    """The manifest signature is missing, malformed, or verifies against no trusted key."""


class DowngradeError(RejectedError):
    """The offered version is not greater than the current one (downgrade or replay)."""


class IncompatibleError(RejectedError):
    """The bundle needs a newer application (``min_app_version``)."""


class ModelCheckError(RejectedError):
    """The engine could not be built or loaded, or it did not reproduce the golden outputs."""


class HealthCheckError(OtaError):
    """The new model failed its health period and was rolled back."""


class StoreError(OtaError):
    """The model store is locked, inconsistent, or cannot perform the operation."""


class TrustError(OtaError):
    """A public key could not be added to, found in or removed from the trust store."""


class DeliveryError(OtaError):
    """An OTA offer, chunk or download is invalid, too large or incomplete."""
