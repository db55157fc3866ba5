"""Errors raised by the device-side inference package.

Tree::

    InferenceError
    ├── SpectrumInputError      bad images, masks or parameters for a spectrum
    ├── BackendUnavailableError a requested backend (cuda, tensorrt, …) cannot start here
    ├── BundleError             a model bundle is malformed, tampered with or unsupported
    │   └── SignatureError      the bundle's signature does not verify
    ├── EngineError             a TensorRT engine could not be built, loaded or run
    ├── ModelStoreError         the model store's state is unreadable or names no active model
    ├── GoldenMismatchError     a backend does not reproduce the bundle's golden outputs
    └── InvalidValueError       a value on the way from pixels to decision is unusable (.stage)
        ├── NonFiniteError      NaN or infinity in a spectrum, image, tensor or model output
        └── ProbabilityError    model outputs that are not probabilities (range, sum, shape)

Foreign errors are wrapped with ``raise ... from`` at the seam.
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base of every error raised by :mod:`inference`."""


class SpectrumInputError(InferenceError, ValueError):
    """Bad input to a spectrum computation; the message names the problem."""


class BackendUnavailableError(InferenceError, RuntimeError):
    """A backend that was asked for cannot start on this machine (never a silent fallback)."""


class BundleError(InferenceError):
    """A model bundle is malformed, incomplete, tampered with or unsupported."""


class SignatureError(BundleError):
    """A bundle's signature does not verify against any trusted key."""


class EngineError(InferenceError):
    """A TensorRT engine could not be built, deserialised or executed."""


class ModelStoreError(InferenceError):
    """The model store's state file cannot be read, is corrupt, or names no active model."""


class GoldenMismatchError(InferenceError):
    """A backend's outputs differ from the bundle's golden outputs beyond tolerance."""


class InvalidValueError(InferenceError):
    """A value produced on the way from pixels to decision cannot be used.

    ``stage`` names where it was produced (``spectrum``, ``render``, ``preprocess``,
    ``infer``), so the caller can fail the slide with that stage instead of deciding a label.
    """

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.detail = message


class NonFiniteError(InvalidValueError):
    """NaN or infinity where only finite numbers are meaningful."""


class ProbabilityError(InvalidValueError):
    """Model outputs outside [0, 1] or not summing to 1 within the stated tolerance."""
