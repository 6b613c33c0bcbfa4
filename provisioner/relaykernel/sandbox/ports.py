"""Loopback ports: pick a free one, and wait until an SSH server answers on one."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable

LOOPBACK = "127.0.0.1"
_POLL_SECONDS = 0.02


def free_loopback_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (callers retry if someone takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((LOOPBACK, 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def read_ssh_banner(port: int, timeout_seconds: float = 1.0) -> bytes | None:
    """The first line an SSH server on 127.0.0.1:port sends, or None if nothing answers with one."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout_seconds) as conn:
            banner = conn.recv(256)
    except OSError:
        return None
    return banner if banner.startswith(b"SSH-2.0") else None


def wait_for_ssh_banner(port: int, timeout_seconds: float, still_worth_waiting: Callable[[], bool]) -> bool:
    """Poll 127.0.0.1:port until it answers ``SSH-2.0``; False on timeout or once waiting is pointless."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline and still_worth_waiting():
        if read_ssh_banner(port, timeout_seconds=max(0.1, deadline - time.monotonic())):
            return True
        time.sleep(_POLL_SECONDS)
    return False


def main(argv: list[str]) -> int:
    """``python -m relaykernel.sandbox.ports PORT TIMEOUT``: the same wait, runnable inside a netns."""
    port, timeout_seconds = int(argv[0]), float(argv[1])
    return 0 if wait_for_ssh_banner(port, timeout_seconds, lambda: True) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
