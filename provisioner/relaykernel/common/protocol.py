"""Names both sides agree on: the kernel's port names, the VM's run dirs, and the wire's version."""

from __future__ import annotations

PROTOCOL_VERSION = 2
"""Bumped whenever the laptop and the VM's supervisor or cell would misunderstand each other."""

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
RUN_ROOT = "~/.relaykernel/run"
CONTROL_SOCKET = "control.sock"
NOTEBOOK_ENV_FILE = "~/.relaykernel/notebook-env.json"  # written by relaykernel.vm.notebook_env

BOOTSTRAP = (
    "import sys,zlib;b=sys.stdin.buffer;n=int(b.readline());"
    "exec(compile(zlib.decompress(b.read(n)),'relaykernel-program','exec'))"
)
"""What ``python3 -c`` runs on the VM: read ``<decimal length>\\n<zlib-compressed program>`` from stdin and run it;
no secret in argv. The rest of stdin stays the program's."""
