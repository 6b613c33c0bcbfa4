"""The handshakes with the VM-side supervisor: launch a kernel, or attach to it again after a cut.

Both run the bundled supervisor over one exec channel and speak JSON lines until the channel switches to the
resumable streams (``{"op": "mux"}``); the channel and any bytes already read past that line go to the link.
"""

from __future__ import annotations

import functools
import json
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .bundle import vm_program
from .common.errors import KERNEL, VM, LinkDown, RemoteLaunchError
from .common.protocol import PROTOCOL_VERSION, RUN_ROOT
from .common.version import __version__, version_mismatch
from .logs import step
from .ssh.chain import SSHChain

log = logging.getLogger(__name__)

SUPERVISOR = "relaykernel.vm.supervisor.main"
_NOT_FOUND_STATUSES = {126, 127}
_MAX_LINE_BYTES = 1 << 20
SPARE_DELAY_SECONDS = 2.0  # after a start, before the next supervisor is started ahead of a restart


@functools.lru_cache(maxsize=1)
def supervisor_program() -> bytes:
    """The supervisor as one program (built once per process; it is the same for every kernel)."""
    return vm_program(SUPERVISOR)


@dataclass
class Handshake:
    """What a launch or an attach ended with: the supervisor's event, and the channel now carrying streams."""

    event: dict[str, Any]
    channel: Any = None
    leftover: bytes = b""
    resumed: bool = False


class RemoteKernel:
    """One kernel's supervisor on the VM, as seen from the laptop: its id, its launch and its re-attaches."""

    def __init__(self, chain: SSHChain, *, kernel_id: str, python_argv: list[str], timeout_seconds: float,
                 window_bytes: int | None = None) -> None:
        self.chain = chain
        self.kernel_id = kernel_id
        self.python_argv = python_argv
        self.timeout_seconds = timeout_seconds
        self.window_bytes = window_bytes
        self.started: dict[str, Any] = {}

    def launch(self, request: dict[str, Any], mux: dict[str, Any], timeout_seconds: float,
               on_sent: Callable[[Any], None] = lambda channel: None) -> Handshake:
        """Start the supervisor and the kernel, then switch to streams; RemoteLaunchError when it cannot.

        ``on_sent(channel)`` runs as soon as the request is on its way: stream frames sent from then on reach the
        kernel as soon as it is up (clients waiting for it save a round trip).
        """
        first = {"mode": "launch", "kernel_id": self.kernel_id, "run_root": RUN_ROOT, **request}
        with step("session for the supervisor, request sent"):
            channel = self._run(first, mux)
        on_sent(channel)
        reader = _LineReader(channel, time.monotonic() + timeout_seconds)
        with step("supervisor started, kernel bound its ports"):
            event = reader.next_event()
        if event is None or event.get("event") != "started":
            failure = self._launch_failure(channel, event, timeout_seconds)
            channel.close()
            raise failure
        _check_protocol(self.chain.vm_label, event)
        mismatch = version_mismatch(__version__, event.get("cell"))
        if mismatch:
            log.warning("%s: %s", self.chain.vm_label, mismatch)
        self.started = event
        answer = reader.next_event()
        if answer is None or answer.get("event") != "mux":
            channel.close()
            raise LinkDown(VM, self.chain.vm_label, "the supervisor did not switch to streams after starting",
                           "relaykernel reconnects by itself")
        return Handshake(event, channel, reader.leftover())

    def attach(self, mux: dict[str, Any]) -> Handshake:
        """Reach the running supervisor again; its mux answer with the channel, or its 'gone' event."""
        first = {"mode": "attach", "kernel_id": self.kernel_id, "run_root": RUN_ROOT}
        channel = self._run(first, mux)
        reader = _LineReader(channel, time.monotonic() + self.timeout_seconds)
        event = reader.next_event()
        if event is None:
            channel.close()
            raise LinkDown(VM, self.chain.vm_label, "re-attaching to the kernel's supervisor got no answer",
                           "relaykernel retries by itself")
        if event.get("event") != "mux":
            channel.close()
            return Handshake(event)
        return Handshake(event, channel, reader.leftover(), resumed=bool(event.get("resumed")))

    def prepare_next(self) -> None:
        """Start the next supervisor ahead (see ``SSHChain.prepare_program``): a restart only sends its request.

        It waits a moment first, so its upload never delays the clients' first messages to the kernel just started.
        """
        self.chain.prepare_program(self.python_argv, supervisor_program(), window_bytes=self.window_bytes,
                                   delay_seconds=SPARE_DELAY_SECONDS)

    def _run(self, first: dict[str, Any], mux: dict[str, Any]) -> Any:
        lines = (json.dumps(first) + "\n" + json.dumps({"op": "mux", **mux}) + "\n").encode()
        return self.chain.start_program(self.python_argv, supervisor_program(), lines, window_bytes=self.window_bytes,
                                        spare=True)

    def _launch_failure(self, channel: Any, event: dict[str, Any] | None, timeout_seconds: float) -> RemoteLaunchError:
        where = self.chain.vm_label
        python = shlex.join(self.python_argv)
        if event is not None and event.get("event") == "error":
            return _supervisor_error(where, python, event)
        status, stderr = _exit_status(channel), _stderr(channel)
        if event is None and status is None:
            return RemoteLaunchError(
                KERNEL, where, f"the kernel did not report its ports within {timeout_seconds:g} s",
                "raise launch_timeout_seconds, or check the VM's load",
            )
        if status in _NOT_FOUND_STATUSES:
            return RemoteLaunchError(
                VM, where, f"remote python {python!r} could not be run ({stderr or f'exit {status}'})",
                "set remote_python to the VM's python (relaykernel install --remote-python PATH)",
            )
        return RemoteLaunchError(
            VM, where, f"the supervisor ended before starting the kernel (exit {status}): {stderr[-500:]}",
            f"check that {python!r} on the VM is Python 3.8 or newer",
        )


class _LineReader:
    """JSON event lines from a channel until a deadline; keeps what follows the last line read."""

    def __init__(self, channel: Any, deadline: float) -> None:
        self.channel = channel
        self.deadline = deadline
        self.buffer = b""

    def next_event(self) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or len(self.buffer) > _MAX_LINE_BYTES:
                return None
            try:
                self.channel.settimeout(left)
                data = self.channel.recv(65536)
            except (OSError, EOFError):
                return None
            if not data:
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            event = json.loads(line)
        except ValueError:
            return {"event": "error", "reason": "request", "message": line[:300].decode(errors="replace")}
        return event if isinstance(event, dict) else None

    def leftover(self) -> bytes:
        return self.buffer


def _check_protocol(where: str, event: dict[str, Any]) -> None:
    theirs = event.get("protocol")
    if theirs != PROTOCOL_VERSION:
        raise RemoteLaunchError(VM, where, f"the VM's supervisor speaks protocol {theirs}, this laptop "
                                f"{PROTOCOL_VERSION}", "this cannot happen with a bundled supervisor; report it")


def _exit_status(channel: Any, timeout_seconds: float = 2.0) -> int | None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if channel.exit_status_ready():
            return int(channel.recv_exit_status())
        time.sleep(0.02)
    return None


def _stderr(channel: Any) -> str:
    chunks = []
    try:
        while channel.recv_stderr_ready():
            chunks.append(channel.recv_stderr(65536))
    except (OSError, EOFError):
        pass
    return b"".join(chunks).decode(errors="replace").strip()


def _supervisor_error(where: str, python: str, event: dict[str, Any]) -> RemoteLaunchError:
    reason, message = event.get("reason", ""), str(event.get("message", "")).strip()
    fixes = {
        "ipykernel": f"install it on the VM: {python} -m pip install ipykernel",
        "python": "set remote_python to a Python 3.8+ that has ipykernel",
        "workdir": "choose a remote_workdir the VM user can write (relaykernel install --remote-workdir DIR)",
        "ports": "the kernel started but never bound its ports; see the kernel log above",
    }
    hop = VM if reason == "workdir" else KERNEL
    return RemoteLaunchError(hop, where, message or f"launch failed ({reason})", fixes.get(reason, ""))


def exit_status_of(event: dict[str, Any]) -> int:
    """The kernel's exit status from a final event ('exited' carries it; 'gone' means it ended unseen)."""
    status = event.get("status")
    return int(status) if isinstance(status, int) else 1
