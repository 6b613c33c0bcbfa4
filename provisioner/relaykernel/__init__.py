"""relaykernel: Jupyter kernels on a relayed notebook VM, reached over SSH."""

__version__ = "0.1.0"
