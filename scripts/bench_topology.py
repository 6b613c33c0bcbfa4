"""The topology both benchmarks run on: the netns one as root, else the loopback sandbox."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from relaykernel.sandbox.topology import LoopbackSandbox, SandboxInfo

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"


def open_topology(stack: contextlib.ExitStack) -> tuple[SandboxInfo, str]:
    """NetnsTopology as root (the VM reachable only through the relay), else the loopback sandbox; and its name."""
    if os.geteuid() == 0:
        sys.path.insert(0, str(TESTS_DIR))
        from topology import NetnsTopology

        sandbox: LoopbackSandbox = NetnsTopology()
        kind = "netns (VM in its own network namespace, reached only through the relay)"
    else:
        sandbox, kind = LoopbackSandbox(), "loopback (relay and VM sshd on 127.0.0.1, not root)"
    stack.callback(sandbox.stop)
    return sandbox.start(), kind
