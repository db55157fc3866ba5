"""PyTorch reference backend: ``model.onnx`` evaluated op by op with ``torch.nn.functional``.

Why an interpreter and not a checkpoint: the bundle's one model file is ``model.onnx`` (signed,
hashed, the thing every other backend runs), so the debugging reference must run the same
graph, independently of ONNX Runtime and TensorRT, and must not depend on the training code's
module layout.  The op table covers what a VGG16/ResNet-style classifier exports to (conv,
pooling, gemm/matmul, softmax and elementwise ops); a graph using anything else makes this
backend unavailable for that bundle, with the op named.  torch is imported lazily; without the
``train`` extra installed the backend is unavailable with a message naming the extra.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from inference.backends.base import F32, InferenceBackend
from inference.bundle import Bundle
from inference.exceptions import BackendUnavailableError, InferenceError

log = logging.getLogger(__name__)

Op = Callable[[Any, list[Any], dict[str, Any]], Any]


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv(f: Any, x: list[Any], a: dict[str, Any]) -> Any:
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise BackendUnavailableError(f"torch backend: asymmetric Conv pads {pads}")
    bias = x[2] if len(x) > 2 else None
    return f.conv2d(
        x[0],
        x[1],
        bias,
        stride=tuple(a.get("strides", [1, 1])),
        padding=tuple(pads[:2]),
        dilation=tuple(a.get("dilations", [1, 1])),
        groups=int(a.get("group", 1)),
    )


def _pool(kind: str) -> Op:
    def run(f: Any, x: list[Any], a: dict[str, Any]) -> Any:
        pads = list(a.get("pads", [0, 0, 0, 0]))
        kwargs = {
            "kernel_size": tuple(a["kernel_shape"]),
            "stride": tuple(a.get("strides", a["kernel_shape"])),
            "padding": tuple(pads[:2]),
            "ceil_mode": bool(a.get("ceil_mode", 0)),
        }
        if kind == "max":
            return f.max_pool2d(x[0], **kwargs)
        return f.avg_pool2d(x[0], count_include_pad=bool(a.get("count_include_pad", 0)), **kwargs)

    return run


def _gemm(f: Any, x: list[Any], a: dict[str, Any]) -> Any:
    mat_a = x[0].t() if a.get("transA", 0) else x[0]
    mat_b = x[1].t() if a.get("transB", 0) else x[1]
    out = float(a.get("alpha", 1.0)) * (mat_a @ mat_b)
    if len(x) > 2:
        out = out + float(a.get("beta", 1.0)) * x[2]
    return out


def _reshape(f: Any, x: list[Any], a: dict[str, Any]) -> Any:
    shape = [int(s) for s in x[1].tolist()]
    # ONNX: 0 copies the input dimension (allowzero=0, the exporters' default).
    shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x[0].reshape(shape)


def _batchnorm(f: Any, x: list[Any], a: dict[str, Any]) -> Any:
    return f.batch_norm(
        x[0], x[3], x[4], x[1], x[2], training=False, eps=float(a.get("epsilon", 1e-5))
    )


OPS: dict[str, Op] = {
    "Conv": _conv,
    "Relu": lambda f, x, a: f.relu(x[0]),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda f, x, a: x[0].mean(dim=(2, 3), keepdim=True),
    "Flatten": lambda f, x, a: x[0].flatten(int(a.get("axis", 1))),
    "Reshape": _reshape,
    "Gemm": _gemm,
    "MatMul": lambda f, x, a: x[0] @ x[1],
    "Add": lambda f, x, a: x[0] + x[1],
    "Sub": lambda f, x, a: x[0] - x[1],
    "Mul": lambda f, x, a: x[0] * x[1],
    "Div": lambda f, x, a: x[0] / x[1],
    "Softmax": lambda f, x, a: f.softmax(x[0], dim=int(a.get("axis", -1))),
    "Identity": lambda f, x, a: x[0],
    "Dropout": lambda f, x, a: x[0],
    "BatchNormalization": _batchnorm,
}


class TorchBackend(InferenceBackend):
    """The ONNX graph interpreted with torch; a reference for debugging, on CPU or CUDA.

    FP16 (``precision="fp16"``) casts the weights and the input to half precision: on a GPU
    this is the stand-in for a TensorRT FP16 engine where TensorRT is not installed, and it
    goes through the same golden gate with the FP16 tolerance.
    """

    name = "torch"
    precisions = ("fp32", "fp16")

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._torch: Any = None
        self._nodes: list[tuple[str, list[str], list[str], dict[str, Any]]] = []
        self._consts: dict[str, Any] = {}
        self._input_name = ""
        self._output_name = ""

    def _load(self, bundle: Bundle) -> None:
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailableError(
                "the torch backend needs PyTorch, from the training extra "
                "(pip install 'omis-edge[train]')"
            ) from exc
        import onnx
        from onnx import numpy_helper

        if self.options.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError("torch backend: device 'cuda' asked for, no CUDA here")
        self._torch = torch
        model = onnx.load(str(bundle.model_path))
        dev = torch.device(self.options.device)
        for init in model.graph.initializer:
            tensor = torch.from_numpy(numpy_helper.to_array(init).copy()).to(dev)
            self._consts[init.name] = self._cast(tensor)
        self._nodes = [self._compile(node, dev) for node in model.graph.node]
        self._nodes = [n for n in self._nodes if n[0] != "Constant"]
        self._input_name = bundle.manifest.input.name
        self._output_name = bundle.manifest.output.name

    def _compile(self, node: Any, dev: Any) -> tuple[str, list[str], list[str], dict[str, Any]]:
        attrs = _attrs(node)
        if node.op_type == "Constant":
            from onnx import numpy_helper

            self._consts[node.output[0]] = self._cast(
                self._torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy()).to(dev)
            )
        elif node.op_type not in OPS:
            raise BackendUnavailableError(
                f"torch backend cannot run this model: ONNX op {node.op_type!r} "
                f"(node {node.name or node.output[0]!r}) is not in its op table"
            )
        return node.op_type, list(node.input), list(node.output), attrs

    def _cast(self, tensor: Any) -> Any:
        """Floating-point tensors in the serving precision; integer ones (shapes) unchanged."""
        if self.precision == "fp16" and tensor.is_floating_point():
            return tensor.half()
        return tensor

    def _infer(self, batch: F32) -> F32:
        torch = self._torch
        f = torch.nn.functional
        env: dict[str, Any] = dict(self._consts)
        env[self._input_name] = self._cast(torch.from_numpy(batch).to(self.options.device))
        with torch.inference_mode():
            for op, inputs, outputs, attrs in self._nodes:
                args = [env[i] for i in inputs if i]
                env[outputs[0]] = OPS[op](f, args, attrs)
        if self._output_name not in env:
            raise InferenceError(f"torch backend: graph has no output {self._output_name!r}")
        out: F32 = env[self._output_name].float().cpu().numpy()
        return np.asarray(out, dtype=np.float32)

    def _describe(self) -> dict[str, Any]:
        return {
            "device": self.options.device,
            "precision": self.precision,
            "version": str(self._torch.__version__),
        }

    def _close(self) -> None:
        self._consts.clear()
        self._nodes = []
