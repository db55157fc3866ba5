"""The appliance: the ``omis`` command, the scanning daemon, MQTT, OTA updates and deployment.

May import :mod:`inference` and :mod:`firmware_bridge`; neither imports it.
"""

from importlib.metadata import version

__version__ = version("omis-edge")

__all__ = ["__version__"]
