"""A kernel launched the way VS Code's Jupyter extension launches a local kernelspec: argv, ports, signals."""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import uuid
from pathlib import Path

from jupyter_client import BlockingKernelClient

from helpers import port_accepts, wait_like_vscode, wait_until
from relaykernel.common.protocol import PORT_NAMES as KERNEL_PORT_NAMES
from relaykernel.sandbox.processes import descendants, signal_all

FIRST_PORT = 9000  # the extension looks for free ports from here up
PORT_POLL_SECONDS = 0.2
DISPOSE_GRACE_SECONDS = 5.0


def free_ports_from(first: int, count: int, taken: set[int]) -> list[int]:
    """``count`` ports at or above ``first`` that nothing listens on and that this launcher has not used."""
    found: list[int] = []
    port = first
    while len(found) < count:
        if port not in taken and _bindable(port):
            found.append(port)
        port += 1
    return found


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class VSCodeKernel:
    """One kernel session as the extension runs it: launch, wait, interrupt, restart and dispose by signals."""

    def __init__(self, spec_dir: Path, *, runtime_dir: Path, notebook_dir: Path, env: dict[str, str]) -> None:
        self.spec_dir = spec_dir
        self.spec = json.loads((spec_dir / "kernel.json").read_text())
        self.runtime_dir = runtime_dir
        self.notebook_dir = notebook_dir
        self.env = {**env, **self.spec.get("env", {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.client: BlockingKernelClient | None = None
        self.connection_file: Path | None = None
        self.log_file: Path | None = None
        self.ports: dict[str, int] = {}
        self._used_ports: set[int] = set()

    def launch(self, timeout_seconds: float = 60.0) -> None:
        """Write a connection file, spawn argv, wait for shell and iopub to accept, then for kernel_info."""
        self.ports = dict(zip(KERNEL_PORT_NAMES, free_ports_from(FIRST_PORT, 5, self._used_ports)))
        self._used_ports.update(self.ports.values())
        info = {**self.ports, "ip": "127.0.0.1", "key": str(uuid.uuid4()), "transport": "tcp",
                "signature_scheme": "hmac-sha256", "kernel_name": self.spec_dir.name}
        self.connection_file = self.runtime_dir / f"kernel-v3{secrets.token_hex(8)}.json"
        self.connection_file.write_text(json.dumps(info))
        self.log_file = self.runtime_dir / f"{self.connection_file.stem}.log"
        with open(self.log_file, "ab") as log:  # the extension reads both pipes; a file never fills up
            self.process = subprocess.Popen(self.argv(), cwd=self.notebook_dir, env=self.env, stdout=log, stderr=log)
        ready = wait_until(lambda: self._exited() or all(port_accepts(self.ports[n]) for n in ("shell_port",
                           "iopub_port")), timeout_seconds, PORT_POLL_SECONDS)
        if not ready or self._exited():
            raise RuntimeError(f"the kernel died: {self.stderr_text()}")
        self.client = BlockingKernelClient()
        self.client.load_connection_info(info)
        self.client.start_channels()
        try:
            wait_like_vscode(self.client, timeout_seconds, alive=lambda: not self._exited())
        except (RuntimeError, TimeoutError):
            self.client.stop_channels()
            self.client = None
            if self._exited():  # what the extension shows as "The kernel died", with the process's stderr
                raise RuntimeError(f"the kernel died: {self.stderr_text()}") from None
            raise

    def argv(self) -> list[str]:
        """The spec's argv with the two placeholders the extension substitutes."""
        assert self.connection_file is not None
        return [item.replace("{connection_file}", str(self.connection_file))
                .replace("{resource_dir}", str(self.spec_dir)) for item in self.spec["argv"]]

    def interrupt(self) -> None:
        """SIGINT to every descendant, then to the process (interrupt_mode: signal)."""
        assert self.process is not None
        signal_all(descendants(self.process.pid), signal.SIGINT)
        self.process.send_signal(signal.SIGINT)

    def dispose(self) -> int | None:
        """SIGTERM to every descendant and the process; SIGKILL what still runs after a grace; the exit code."""
        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        if self.process is None:
            return None
        process, self.process = self.process, None
        signal_all(descendants(process.pid), signal.SIGTERM)
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(DISPOSE_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        if self.connection_file is not None:
            self.connection_file.unlink(missing_ok=True)
        return code

    def restart(self, timeout_seconds: float = 60.0) -> dict[str, int]:
        """Kill and launch afresh on new ports, as the extension restarts; the old ports."""
        old_ports = dict(self.ports)
        self.dispose()
        self.launch(timeout_seconds)
        return old_ports

    def stderr_text(self) -> str:
        """What the launcher printed (VS Code shows it under "The kernel died")."""
        return self.log_file.read_text(errors="replace") if self.log_file and self.log_file.exists() else ""

    def _exited(self) -> bool:
        return self.process is None or self.process.poll() is not None


def listening(ports: dict[str, int]) -> list[int]:
    """The ones among ``ports`` that something still accepts connections on."""
    return [port for port in ports.values() if port_accepts(port)]

