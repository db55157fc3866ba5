"""Off-device training and evaluation (PyTorch): data, VGG16 as in the study, cross-validation,
classical baselines, ONNX export and the model bundle.

May import :mod:`inference` (the same spectrum and rendering code as the device) and
:mod:`firmware_bridge` (the simulator); neither imports it.
"""

__all__: list[str] = []
