"""What doctor asks the VM: this Python, its ipykernel, the work dir's writability and the cell's version.

Sent as a program (``relaykernel.bundle``) with the work dir as its one argument; answers one JSON line
{"python", "executable", "ipykernel", "debugpy", "workdir", "workdir_error", "cell", "program", "gpu"} and exits 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile

from ..common.version import cell_info, read_cell_info
from .status import gpu_summary


def ipykernel_version() -> str | None:
    """ipykernel's version as this Python would import it, or None when it is missing."""
    try:
        import ipykernel
    except ImportError:
        return None
    return str(getattr(ipykernel, "__version__", "unknown"))


def workdir_error(workdir: str) -> str | None:
    """None when WORKDIR exists (or can be made) and a file can be written there, else why not."""
    path = os.path.expanduser(workdir)
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        return f"{path}: {error.strerror or error}"
    return None


def report(workdir: str) -> dict:
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "ipykernel": ipykernel_version(),
        "debugpy": importlib.util.find_spec("debugpy") is not None,
        "workdir": os.path.abspath(os.path.expanduser(workdir)),
        "workdir_error": workdir_error(workdir),
        "cell": read_cell_info(),
        "program": cell_info(),
        "gpu": gpu_summary(),
    }


def main() -> int:
    workdir = sys.argv[1] if len(sys.argv) > 1 else "~"
    sys.stdout.write(json.dumps(report(workdir)) + "\n")
    sys.stdout.flush()
    return 0
