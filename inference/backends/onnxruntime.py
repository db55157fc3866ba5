"""ONNX Runtime backend: CPU always; the CUDA or TensorRT execution providers when asked.

A provider asked for explicitly that this onnxruntime build lacks raises
:class:`BackendUnavailableError`; it never quietly runs on the CPU instead.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from inference.backends.base import F32, InferenceBackend
from inference.bundle import Bundle
from inference.exceptions import BackendUnavailableError, InferenceError

log = logging.getLogger(__name__)

# option value -> the execution providers to request, most preferred first.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


class OnnxRuntimeBackend(InferenceBackend):
    """Runs ``model.onnx`` with an ONNX Runtime session (FP32)."""

    name = "onnxruntime"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._session: Any = None
        self._input_name = ""
        self._output_name = ""

    def _load(self, bundle: Bundle) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(f"onnxruntime is not installed ({exc})") from exc
        providers = self._providers(ort.get_available_providers())
        so = ort.SessionOptions()
        # Same thread count -> same reduction order -> identical results run to run.
        so.intra_op_num_threads = self.options.threads or 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(bundle.model_path), sess_options=so, providers=list(providers)
            )
        except Exception as exc:  # onnxruntime raises its own untyped error classes
            raise InferenceError(f"onnxruntime could not load {bundle.model_path}: {exc}") from exc
        self._input_name = bundle.manifest.input.name
        self._output_name = bundle.manifest.output.name
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if self._input_name not in inputs or self._output_name not in outputs:
            raise InferenceError(
                f"model.onnx has inputs {inputs} and outputs {outputs}; the manifest names "
                f"{self._input_name!r} -> {self._output_name!r}"
            )

    def _providers(self, available: list[str]) -> tuple[str, ...]:
        wanted = self.options.provider
        if wanted not in PROVIDERS:
            raise InferenceError(
                f"unknown onnxruntime provider {wanted!r}; choose one of {', '.join(PROVIDERS)}"
            )
        chain = PROVIDERS[wanted]
        if chain[0] not in available:
            raise BackendUnavailableError(
                f"onnxruntime provider {wanted!r} ({chain[0]}) is not available here; "
                f"available: {', '.join(available)}"
            )
        return tuple(p for p in chain if p in available)

    def _infer(self, batch: F32) -> F32:
        try:
            (out,) = self._session.run([self._output_name], {self._input_name: batch})
        except Exception as exc:  # onnxruntime raises its own untyped error classes
            raise InferenceError(f"onnxruntime inference failed: {exc}") from exc
        return np.asarray(out, dtype=np.float32)

    def _describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            "providers": list(self._session.get_providers()),
            "device": "gpu" if self.options.provider != "cpu" else "cpu",
            "version": ort.__version__,
        }

    def _close(self) -> None:
        self._session = None
