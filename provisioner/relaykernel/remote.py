"""Start, attach to, signal and stop the VM-side supervisor that owns one remote kernel."""

from __future__ import annotations

import logging
import shlex
import threading
from importlib import resources
from typing import Any

from .common.errors import KERNEL, VM, LinkDown, RemoteLaunchError
from .control import EOF_EVENT, ControlStream
from .forward import KERNEL_PORT_NAMES
from .ssh.chain import SSHChain
from .vm.supervisor import BOOTSTRAP

log = logging.getLogger(__name__)

RUN_ROOT = "~/.relaykernel/run"
_NOT_FOUND_STATUSES = {126, 127}


def supervisor_script() -> bytes:
    """The supervisor's source, sent to the VM as a script (it is never installed there)."""
    return resources.files("relaykernel.vm").joinpath("supervisor.py").read_bytes()


class RemoteKernel:
    """The client side of one supervisor: launch, re-attach after a cut, renew, signal, shut down."""

    def __init__(self, chain: SSHChain, *, kernel_id: str, python_argv: list[str], timeout_seconds: float) -> None:
        self.chain = chain
        self.kernel_id = kernel_id
        self.python_argv = python_argv
        self.timeout_seconds = timeout_seconds
        self.stream: ControlStream | None = None
        self.started: dict[str, Any] = {}
        self._request_lock = threading.Lock()

    @property
    def ports(self) -> dict[str, int]:
        return {name: int(self.started["ports"][name]) for name in KERNEL_PORT_NAMES}

    def launch(self, request: dict[str, Any], timeout_seconds: float) -> dict[str, Any]:
        """Start the supervisor and the kernel; the 'started' event, or RemoteLaunchError."""
        stream = self._run_supervisor("launch")
        stream.send({"mode": "launch", "kernel_id": self.kernel_id, "run_root": RUN_ROOT, **request})
        event = stream.wait_for({"started"}, timeout_seconds)
        if event is None or event.get("event") != "started":
            failure = self._launch_failure(stream, event, timeout_seconds)
            stream.close()
            raise failure
        self.stream, self.started = stream, event
        return event

    def attach(self) -> dict[str, Any]:
        """Reconnect to the running supervisor; its status, or a final event when the kernel is gone."""
        stream = self._run_supervisor("attach")
        stream.send({"mode": "attach", "kernel_id": self.kernel_id, "run_root": RUN_ROOT})
        event = stream.request({"op": "status"}, {"status"}, self.timeout_seconds)
        if event is None or event.get("event") == EOF_EVENT:
            stream.close()
            raise LinkDown(VM, self.chain.vm_label, "re-attaching to the kernel's supervisor got no answer", "")
        self._replace_stream(stream)
        return event

    def renew(self) -> bool:
        """Renew the lease; True when the supervisor answered (this is also the liveness probe)."""
        event = self._request({"op": "renew"}, {"renewed"})
        return event is not None and event.get("event") != EOF_EVENT

    def signal(self, signum: int) -> None:
        """Deliver a signal to the kernel's process group on the VM."""
        event = self._request({"op": "signal", "signum": int(signum)}, {"signalled"})
        if event is None or event.get("event") == EOF_EVENT:
            raise LinkDown(KERNEL, self.chain.vm_label, f"signal {signum} could not be delivered", "")

    def shutdown(self) -> int | None:
        """Stop the kernel (TERM, then KILL on the VM) and remove its files; its exit status."""
        event = self._request({"op": "shutdown"}, {"exited"})
        return self.exit_status() if event is None else _status_of(event)

    def exit_status(self) -> int | None:
        """The kernel's exit status once the supervisor reported its end, else None."""
        final = self.stream.final_event if self.stream else None
        return None if final is None else _status_of(final)

    def link_lost(self) -> bool:
        """True when the control channel has closed (the supervisor lives on under its lease)."""
        return self.stream is None or self.stream.closed.is_set()

    def close(self) -> None:
        """Close the control channel; the supervisor keeps the kernel until shutdown or lease end."""
        if self.stream is not None:
            self.stream.close()

    def _request(self, message: dict[str, Any], answers: set[str]) -> dict[str, Any] | None:
        with self._request_lock:
            if self.stream is None:
                return None
            return self.stream.request(message, answers, self.timeout_seconds)

    def _replace_stream(self, stream: ControlStream) -> None:
        old, self.stream = self.stream, stream
        if old is not None:
            old.close()

    def _run_supervisor(self, purpose: str) -> ControlStream:
        channel = self.chain.open_session()
        channel.settimeout(None)
        channel.exec_command(shlex.join([*self.python_argv, "-c", BOOTSTRAP]))
        stream = ControlStream(channel, name=f"{purpose}-{self.kernel_id[:8]}")
        script = supervisor_script()
        stream.send_raw(b"%d\n" % len(script) + script)
        return stream

    def _launch_failure(
        self, stream: ControlStream, event: dict[str, Any] | None, timeout_seconds: float
    ) -> RemoteLaunchError:
        where = self.chain.vm_label
        python = shlex.join(self.python_argv)
        if event is None:
            return RemoteLaunchError(
                KERNEL, where, f"the kernel did not report its ports within {timeout_seconds:g} s",
                "raise launch_timeout_seconds, or check the VM's load",
            )
        if event.get("event") == "error":
            return _supervisor_error(where, python, event)
        status, stderr = stream.exit_status(), stream.stderr_text()
        if status in _NOT_FOUND_STATUSES:
            return RemoteLaunchError(
                VM, where, f"remote python {python!r} could not be run ({stderr or f'exit {status}'})",
                "set remote_python to the VM's python (relaykernel install --remote-python PATH)",
            )
        return RemoteLaunchError(
            VM, where, f"the supervisor ended before starting the kernel (exit {status}): {stderr[-500:]}",
            f"check that {python!r} on the VM is Python 3.8 or newer",
        )


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


def _status_of(event: dict[str, Any]) -> int:
    status = event.get("status")
    return int(status) if isinstance(status, int) else 1
