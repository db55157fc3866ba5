"""Microscope side: the serial firmware bridge, cameras, acquisition and the simulated sample.

This package is the bottom layer: it imports nothing from ``inference``, ``training``
or ``deploy``.
"""

__all__: list[str] = []
