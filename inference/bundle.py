"""The model bundle (``omis.bundle/1``): the model and its whole contract, as one directory.

Layout::

    manifest.json     this module's :class:`Manifest`; signed as exact bytes
    manifest.sig      Ed25519 signature of manifest.json (optional until installed by OTA)
    model.onnx        probabilities as output, dynamic batch axis
    golden/inputs.npy   float32 N×C×H×W network inputs (already preprocessed)
    golden/outputs.npy  float32 N×K reference probabilities
    golden/fields/NNN-diffuse.png, NNN-polarized.png   golden field pairs (``golden.fields``)
    golden/path/*.npy   what the whole device path must make of them (inference.golden_path)

Every file other than the manifest and its signature is listed with its sha256 and size;
:func:`load_bundle` refuses missing, extra or altered files.  Nothing on the device guesses
the spectrum, rendering or normalisation parameters: they all come from the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from inference.bundle_checks import (
    DEFAULT_TOLERANCE,
    MAX_GOLDEN_FIELDS,
    MAX_VERSION,
    Finite,
    PositiveFinite,
    Probability,
    check_runnable,
    first_error,
    golden_path_files,
    load_array,
    strict_json,
)
from inference.exceptions import BundleError, InferenceError

if TYPE_CHECKING:
    from inference.spectrum.qc import QCThresholds

SCHEMA = "omis.bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MODEL = "model.onnx"
GOLDEN_INPUTS = "golden/inputs.npy"
GOLDEN_OUTPUTS = "golden/outputs.npy"
UNLISTED = frozenset({MANIFEST, SIGNATURE})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class FileEntry(_Strict):
    """Integrity record of one bundle file."""

    sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the file")
    size: StrictInt = Field(ge=0, lt=MAX_VERSION, description="size in bytes")


class Normalization(_Strict):
    """``x = (pixel * scale - mean[c]) / std[c]`` per channel, in R, G, B order."""

    scale: PositiveFinite = Field(1.0 / 255.0, description="applied to uint8 pixels first")
    mean: tuple[Finite, Finite, Finite] = Field((0.485, 0.456, 0.406), description="per channel")
    std: tuple[PositiveFinite, PositiveFinite, PositiveFinite] = Field(
        (0.229, 0.224, 0.225), description="per channel; a zero would divide by zero"
    )


class InputSpec(_Strict):
    """The network input tensor.

    ``representation`` says what the model reads: ``image`` (the rendered spectrum, N×3×H×W,
    normalised per channel) or ``spectrum`` (the slide's full spectrum vector on the bundle
    algorithm's axis as N×1×1×L, multiplied by ``normalization.scale``; mean and std unused).
    """

    name: StrictStr = Field("input", min_length=1, description="ONNX input name")
    representation: Literal["image", "spectrum"] = Field(
        "image", description="what the network reads: the rendered image or the spectrum vector"
    )
    shape: tuple[StrictInt, StrictInt, StrictInt, StrictInt] = Field(
        (-1, 3, 224, 224), description="N, C, H, W; -1 marks the dynamic batch axis"
    )
    dtype: Literal["float32"] = "float32"
    layout: Literal["NCHW"] = "NCHW"
    normalization: Normalization = Normalization()

    @model_validator(mode="after")
    def _sizes(self) -> InputSpec:
        n, c, h, w = self.shape
        if n != -1 and n < 1:
            raise ValueError(f"shape: batch must be -1 (dynamic) or at least 1, got {n}")
        if not (1 <= h <= 4096 and 1 <= w <= 4096):
            raise ValueError(f"shape: height and width must be within 1..4096, got {h}x{w}")
        if self.representation == "image" and c != 3:
            raise ValueError(f"an image input needs 3 channels, got shape {self.shape}")
        if self.representation == "spectrum" and (c, h) != (1, 1):
            raise ValueError(f"a spectrum input is N×1×1×L, got shape {self.shape}")
        return self

    @property
    def height(self) -> int:
        """Input height in pixels."""
        return self.shape[2]

    @property
    def width(self) -> int:
        """Input width in pixels."""
        return self.shape[3]


class OutputSpec(_Strict):
    """The network output tensor (softmax probabilities)."""

    name: StrictStr = Field("probabilities", min_length=1, description="ONNX output name")


class Thresholds(_Strict):
    """Decision on the probability of high risk, with an abstain band for human review."""

    decision: Probability = Field(0.5, description="p(high) >= decision -> high risk")
    abstain_low: Probability = Field(0.35, description="lower edge of the abstain band")
    abstain_high: Probability = Field(0.65, description="upper edge of the band")
    chosen_on: Literal["default", "validation"] = Field(
        "default", description="where decision and band come from: defaults or validation data"
    )
    target_sensitivity: float | None = Field(
        None, gt=0.0, le=1.0, description="sensitivity the decision threshold was chosen for"
    )
    temperature: float = Field(
        1.0, gt=0.0, description="softmax temperature fitted on validation (already in the model)"
    )
    out_of_range: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="a slide with more than this fraction of its absolute spectral mass outside "
        "the render window is unlike the training data (None: not checked)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if not self.abstain_low <= self.decision <= self.abstain_high:
            raise ValueError("need abstain_low <= decision <= abstain_high")
        return self


class GoldenSpec(_Strict):
    """How closely a backend must reproduce the golden outputs before it serves."""

    tolerance: dict[Literal["fp32", "fp16"], Annotated[PositiveFinite, Field(le=1.0)]] = Field(
        default_factory=lambda: dict(DEFAULT_TOLERANCE),
        description="max absolute probability difference per precision",
    )
    fields: StrictInt = Field(
        0,
        ge=0,
        le=MAX_GOLDEN_FIELDS,
        description="golden field pairs under golden/fields/, with their expected spectrum, "
        "image, tensor and probabilities under golden/path/ (0: none; the device then refuses "
        "the bundle, since its own path cannot be proven)",
    )
    allow_fp32_fallback: StrictBool = Field(
        True, description="if an FP16 engine fails the gate, FP32 may serve (device: degraded)"
    )


class Pretrained(_Strict):
    """Initial weights a model was trained from."""

    source: str = Field(min_length=1, description="where the weights came from (file name)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the weights file")


class OperatingPoint(_Strict):
    """The rates the shipped thresholds and QC were validated at (the OTA health period judges a
    new model against them: ``deploy.appliance.health``)."""

    referral_rate: Probability = Field(
        description="referral rate the abstain band is validated not to exceed on new slides "
        "(upper confidence bound from slides the model never saw)"
    )
    slides: StrictInt = Field(ge=0, description="slides the referral rate was measured on")
    no_usable_field_rate: Probability = Field(
        description="share of the training data's slides on which no field passed this QC"
    )
    field_acceptance: Probability | None = Field(
        None, description="share of the training data's fields this QC accepted"
    )
    measured_on: StrictStr = Field("", description="which slides the referral rate comes from")


class Training(_Strict):
    """Where the model came from."""

    code_revision: StrictStr = Field("unknown", description="git revision of the training code")
    data_manifest_sha256: StrictStr = Field(
        "", pattern=r"^([0-9a-f]{64})?$", description="sha256 of the training data manifest"
    )
    metrics: dict[str, Any] = Field(default_factory=dict, description="pooled CV metrics")
    preset: StrictStr = Field("", description="training preset (paper, tiny, spectrum1d)")
    pretrained: Pretrained | None = Field(
        None, description="initial weights: None = trained from scratch"
    )
    data_files_sha256: str = Field(
        "", description="sha256 over the manifest and every image or spectrum file read"
    )
    operating_point: OperatingPoint | None = Field(
        None, description="validated referral and no-usable-field rates (None: not recorded)"
    )


class Manifest(_Strict):
    """``manifest.json`` of a bundle."""

    schema_: Literal["omis.bundle/1"] = Field("omis.bundle/1", alias="schema")
    name: StrictStr = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    version: StrictInt = Field(
        ge=1, lt=MAX_VERSION, description="a JSON integer below 2**53 that only grows"
    )
    created: StrictStr = Field(
        pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$",
        description="RFC 3339 time of creation (informational only)",
    )
    task: Literal["binary", "pap4", "ii-v"]
    classes: tuple[Annotated[StrictStr, Field(min_length=1)], ...] = Field(min_length=2)
    risk: dict[str, Literal["low", "high"]] = Field(description="class -> risk")
    input: InputSpec = InputSpec()
    output: OutputSpec = OutputSpec()
    spectrum: dict[str, Any] = Field(description="spectrum algorithm and all its parameters")
    render: dict[str, Any] = Field(description="all rendering parameters")
    thresholds: Thresholds = Thresholds()
    qc: dict[str, Any] = Field(
        default_factory=dict,
        description="field quality-control thresholds the training data passed "
        "(inference.spectrum.qc.QCThresholds; empty: the defaults); the device applies them",
    )
    golden: GoldenSpec = GoldenSpec()
    files: dict[str, FileEntry]
    training: Training = Training()
    min_app_version: StrictStr = Field("0.1.0", pattern=r"^\d+\.\d+\.\d+$")

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, populate_by_name=True
    )

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be distinct")
        if set(self.risk) != set(self.classes):
            raise ValueError("risk must map exactly the classes")
        if set(self.risk.values()) != {"low", "high"}:
            raise ValueError("risk must contain both low and high classes")
        path_files = golden_path_files(self.golden.fields)
        for required in (MODEL, GOLDEN_INPUTS, GOLDEN_OUTPUTS, *path_files):
            if required not in self.files:
                raise ValueError(f"files must list {required}")
        for name in self.files:
            _check_relpath(name)
        check_runnable(self.spectrum, self.render, self.input.representation, self.input.shape)
        return self

    @field_validator("qc")
    @classmethod
    def _qc_known(cls, qc: dict[str, Any]) -> dict[str, Any]:
        from inference.spectrum.qc import qc_thresholds_from_json

        try:
            qc_thresholds_from_json(qc)
        except InferenceError as exc:
            raise ValueError(str(exc)) from exc
        return qc

    def to_json_bytes(self) -> bytes:
        """Canonical bytes of the manifest (sorted keys, 2-space indent, trailing newline)."""
        data = self.model_dump(mode="json", by_alias=True)
        return (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")

    @property
    def qc_thresholds(self) -> QCThresholds:
        """The QC thresholds the model was trained with (validated with the manifest)."""
        from inference.spectrum.qc import qc_thresholds_from_json

        return qc_thresholds_from_json(self.qc)

    @property
    def high_classes(self) -> tuple[int, ...]:
        """Indices of the classes whose risk is high."""
        return tuple(i for i, c in enumerate(self.classes) if self.risk[c] == "high")


def _check_relpath(name: str) -> None:
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or name != p.as_posix() or not name:
        raise ValueError(f"bundle file name {name!r} is not a safe relative path")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def now_rfc3339() -> str:
    """Current UTC time in RFC 3339 with a Z suffix."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def file_entries(root: Path) -> dict[str, FileEntry]:
    """Hash every regular file under ``root`` except the manifest and its signature."""
    entries: dict[str, FileEntry] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise BundleError(f"{path.relative_to(root)}: links are not allowed in a bundle")
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        if rel in UNLISTED:
            continue
        entries[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    return entries


def parse_manifest(data: bytes, source: str = MANIFEST) -> Manifest:
    """Parse and validate manifest bytes, with an error naming the offending key."""
    try:
        raw = strict_json(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{source}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{source}: expected a JSON object")
    if raw.get("schema") != SCHEMA:
        raise BundleError(f"{source}: unsupported schema {raw.get('schema')!r} (need {SCHEMA})")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{source}: {first_error(exc)}") from exc


@dataclass(frozen=True)
class Bundle:
    """A bundle directory whose files have been checked against its manifest."""

    root: Path
    manifest: Manifest
    manifest_bytes: bytes

    @property
    def model_path(self) -> Path:
        """Path of model.onnx."""
        return self.root / MODEL

    @property
    def model_sha256(self) -> str:
        """sha256 of model.onnx as listed (and verified)."""
        return self.manifest.files[MODEL].sha256

    @property
    def signature_path(self) -> Path:
        """Path of manifest.sig (may not exist)."""
        return self.root / SIGNATURE

    def golden(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The golden inputs and reference outputs, checked for dtype, shape and finiteness."""
        m = self.manifest
        inputs = load_array(self.root, GOLDEN_INPUTS, np.float32, (None, *m.input.shape[1:]))
        outputs = load_array(self.root, GOLDEN_OUTPUTS, np.float32, (len(inputs), len(m.classes)))
        return inputs, outputs

    def describe(self) -> dict[str, Any]:
        """Name, version and model hash, as results and status report them."""
        m = self.manifest
        return {"name": m.name, "version": m.version, "sha256": self.model_sha256}


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check that the directory holds exactly the listed files with the listed hashes."""
    actual = file_entries(root)
    missing = sorted(set(manifest.files) - set(actual))
    extra = sorted(set(actual) - set(manifest.files))
    if missing:
        raise BundleError(f"bundle is missing listed file(s): {', '.join(missing)}")
    if extra:
        raise BundleError(f"bundle has unlisted file(s): {', '.join(extra)}")
    for name, entry in manifest.files.items():
        got = actual[name]
        if got.size != entry.size:
            raise BundleError(f"{name}: size {got.size} differs from manifest ({entry.size})")
        if got.sha256 != entry.sha256:
            raise BundleError(f"{name}: sha256 differs from manifest (file altered)")


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a bundle directory and verify every file against its manifest.

    Signatures are checked separately (``deploy`` does it against the trust store).
    """
    root = Path(path)
    if root.is_file() and tarfile.is_tarfile(root):
        raise BundleError(f"{root}: a .tar bundle must be unpacked first (omis ota install does)")
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root}: no {MANIFEST}")
    data = mpath.read_bytes()
    manifest = parse_manifest(data, str(mpath))
    verify_files(root, manifest)
    return Bundle(root=root, manifest=manifest, manifest_bytes=data)


def build_manifest(root: Path, **fields: Any) -> Manifest:
    """Build a manifest for the files now in ``root`` (everything but manifest and signature)."""
    fields.setdefault("created", now_rfc3339())
    try:
        return Manifest.model_validate({**fields, "files": file_entries(root)})
    except ValidationError as exc:
        raise BundleError(f"manifest: {first_error(exc)}") from exc
