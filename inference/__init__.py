"""Device side: the OMIS spectrum (CPU and CUDA), spectrum images, bundles and inference backends.

Importing this package never imports torch, TensorRT or pycuda; those are imported lazily by
the backends that need them.
"""

__all__: list[str] = []
