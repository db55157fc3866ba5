"""Test stand-ins: tiny bundles made without torch, and a TensorRT / pycuda surface."""
