"""Signals, process groups and liveness the same way on POSIX and Windows: the laptop side's one platform switch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

WINDOWS = sys.platform == "win32"

STOP_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGBREAK") if hasattr(signal, name)
)
"""Signals that ask a process to end: SIGTERM everywhere, SIGHUP on POSIX (terminal gone), SIGBREAK on Windows."""


def on_stop_signals(handler: Callable[[int, Any], None]) -> None:
    """Call ``handler`` for every stop signal this platform has."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def new_group_options() -> dict[str, Any]:
    """Popen keyword arguments that start a child in a process group of its own (so it can be ended as one)."""
    if WINDOWS:
        return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
    return {"start_new_session": True}


def signal_group(pid: int, signum: int) -> None:
    """Send ``signum`` to the group ``pid`` leads (POSIX), or end the process tree (Windows has no groups to signal).

    ProcessLookupError when it is already gone.
    """
    if WINDOWS:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, timeout=10, check=False)
        return
    os.killpg(pid, signum)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; never sends it anything (on Windows ``os.kill`` would terminate it)."""
    if not WINDOWS:
        from .pids import pid_alive as posix_pid_alive  # noqa: PLC0415 - POSIX answer kept in one place

        return posix_pid_alive(pid)
    import ctypes  # noqa: PLC0415 - Windows only

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x00100000 | 0x1000, False, pid)  # SYNCHRONIZE | PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        return bool(kernel32.WaitForSingleObject(handle, 0) == 0x102)  # WAIT_TIMEOUT: still running
    finally:
        kernel32.CloseHandle(handle)
