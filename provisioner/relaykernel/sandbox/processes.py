"""Stop the processes the sandbox started, including the children they left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from ..pids import pid_alive

_PROC = Path("/proc")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), parents before children."""
    children = _children_by_parent()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found.extend(kids)
        frontier.extend(kids)
    return found


def _children_by_parent() -> dict[int, list[int]]:
    if not _PROC.is_dir():
        return _children_by_parent_from_ps()
    table: dict[int, list[int]] = {}
    for stat in _PROC.glob("[0-9]*/stat"):
        try:
            # The command name may hold spaces and parentheses; ppid is the 2nd field after the last ')'.
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table.setdefault(ppid, []).append(int(stat.parent.name))
    return table


def _children_by_parent_from_ps() -> dict[int, list[int]]:
    listing = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=False)
    table: dict[int, list[int]] = {}
    for line in listing.stdout.splitlines():
        pid, ppid = (int(part) for part in line.split())
        table.setdefault(ppid, []).append(pid)
    return table


def signal_all(pids: list[int], signum: int) -> None:
    """Send ``signum`` to each pid that still exists."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def wait_gone(pids: list[int], timeout_seconds: float) -> list[int]:
    """Wait until none of ``pids`` exists; return those still alive at the timeout."""
    deadline = time.monotonic() + timeout_seconds
    alive = [pid for pid in pids if pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if pid_alive(pid)]
    return alive


def terminate_all(pids: list[int], timeout_seconds: float = 2.0) -> None:
    """SIGTERM each pid, then SIGKILL those still there after ``timeout_seconds``.

    Where the platform has pidfds the signals go through them, so a pid that ended meanwhile and was reused by
    another process (a busy machine wraps its pid counter in minutes) is never signalled by mistake.
    """
    handles = _pidfds(pids)
    try:
        for pid in pids:
            _send(handles, pid, signal.SIGTERM)
        for pid in wait_gone(pids, timeout_seconds):
            _send(handles, pid, signal.SIGKILL)
    finally:
        for handle in handles.values():
            os.close(handle)


def _pidfds(pids: list[int]) -> dict[int, int]:
    handles: dict[int, int] = {}
    if not hasattr(os, "pidfd_open"):
        return handles
    for pid in pids:
        with contextlib.suppress(OSError):
            handles[pid] = os.pidfd_open(pid)
    return handles


def _send(handles: dict[int, int], pid: int, signum: int) -> None:
    handle = handles.get(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if handle is None:
            if not hasattr(os, "pidfd_open"):
                os.kill(pid, signum)  # no pidfds here: the plain pid is all there is
            return  # it was already gone when the handles were taken
        signal.pidfd_send_signal(handle, signum)


def stop_process_tree(process: subprocess.Popen[bytes], timeout_seconds: float = 3.0) -> None:
    """Stop everything below ``process``, then ``process``; SIGKILL what ignores SIGTERM. Safe to call twice."""
    # Children first: wrappers such as runuser wait for their child and exit with it (on SIGTERM
    # runuser would instead give the child 2 s of grace), and sshd's sessions outlive the listener.
    below = descendants(process.pid) if process.poll() is None else []
    handles = _pidfds(below)
    try:
        for pid in below:
            _send(handles, pid, signal.SIGTERM)
        stubborn = wait_gone(below, timeout_seconds)
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_seconds)
        for pid in stubborn:
            _send(handles, pid, signal.SIGKILL)
    finally:
        for handle in handles.values():
            os.close(handle)


def log_tail(path: Path, lines: int) -> str:
    """The last lines of a process's log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
