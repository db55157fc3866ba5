"""Errors raised by the off-device training package.

Tree::

    TrainingError
    ├── DataError               bad dataset: manifest rows, missing files, unusable spectra
    ├── ConfigError             bad options or presets (unknown task, bad pretrained weights)
    ├── DeviceUnavailableError  a requested compute device (cuda) is not usable here
    └── ExportError             ONNX export, checker or golden comparison failed

Foreign errors (``InputError`` from image reading, ``SpectrumInputError``, ``OSError``,
``onnx.checker.ValidationError``) are wrapped with ``raise ... from`` at the seam.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Base of every error raised by :mod:`training`."""


class DataError(TrainingError, ValueError):
    """The dataset cannot be used as given; the message names rows, files or values."""


class ConfigError(TrainingError, ValueError):
    """Bad training options, preset or pretrained weights."""


class DeviceUnavailableError(TrainingError, RuntimeError):
    """A requested compute device cannot be used (never a silent fallback to another)."""


class ExportError(TrainingError):
    """The model could not be exported, checked or reproduced by ONNX Runtime."""
