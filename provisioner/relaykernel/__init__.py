"""relaykernel: Jupyter kernels on a relayed notebook VM, reached over SSH."""

from .common.version import __version__

__all__ = ["__version__"]
