"""Capture the notebook process's environment for the kernels relaykernel starts over SSH (stdlib only).

An SSH session starts with a login environment, not the notebook's: on Colab it lacks
LD_LIBRARY_PATH=/usr/lib64-nvidia, so CUDA and nvidia-smi fail there. The heartbeat cell writes the notebook's
variables to NOTEBOOK_ENV_FILE (0600: platforms keep tokens in the environment) and the kernel supervisor applies
them to every kernel it starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from ..common.protocol import NOTEBOOK_ENV_FILE
from .private import write_private

# What belongs to this process or its login and would be wrong in another one.
_SKIPPED_NAMES = frozenset({
    "HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "SHLVL", "_", "TERM", "COLUMNS", "LINES", "MAIL",
    "PAGER", "GIT_PAGER", "CLICOLOR", "FORCE_COLOR", "TMUX", "STY", "KERNEL_ID",
})
_SKIPPED_PREFIXES = ("JPY_", "SSH_", "PYDEVD_", "DEBUGPY_", "VSCODE_", "TERM_")


def notebook_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables a remote kernel should share with the notebook: all but this process's own."""
    return {
        name: value for name, value in environ.items()
        if name not in _SKIPPED_NAMES and not name.startswith(_SKIPPED_PREFIXES)
    }


def capture_notebook_env(environ: Mapping[str, str] | None = None, path: str = NOTEBOOK_ENV_FILE) -> str:
    """Write the notebook's variables for kernels to apply; the file's path."""
    target = Path(os.path.expanduser(path))
    variables = notebook_variables(os.environ if environ is None else environ)
    write_private(target, json.dumps(variables, indent=1, sort_keys=True))
    return str(target)
