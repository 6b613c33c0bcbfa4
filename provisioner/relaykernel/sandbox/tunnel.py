"""The VM's side of the relay: ``ssh -N -R`` that publishes the VM's sshd on the relay's loopback."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import TracebackType

from ..common.errors import RELAY, ConnectError, ForwardRefused
from .ports import LOOPBACK, wait_for_ssh_banner
from .processes import log_tail, stop_process_tree
from .tools import find_tool


class ReverseTunnel:
    """``ssh -N -R 127.0.0.1:FWD:127.0.0.1:VMPORT relayuser@relay``, as a notebook VM would run it."""

    def __init__(
        self,
        *,
        relay_user: str,
        relay_port: int,
        forward_port: int,
        vm_sshd_port: int,
        identity_file: Path | str,
        known_hosts_file: Path | str,
        log_file: Path | str,
        proxy_command: str | None = None,
        netns: str | None = None,
        run_as: str | None = None,
        keepalive_seconds: int = 5,
        startup_timeout_seconds: float = 5.0,
    ) -> None:
        self.relay_user = relay_user
        self.relay_port = relay_port
        self.forward_port = forward_port
        self.vm_sshd_port = vm_sshd_port
        self.identity_file = Path(identity_file)
        self.known_hosts_file = Path(known_hosts_file)
        self.log_file = Path(log_file)
        self.proxy_command = proxy_command
        self.netns = netns
        self.run_as = run_as
        self.keepalive_seconds = keepalive_seconds
        self.startup_timeout_seconds = startup_timeout_seconds
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def argv(self) -> list[str]:
        """The full command line: optional netns and user prefix, then ssh."""
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        if self.run_as:
            prefix += ["runuser", "-u", self.run_as, "--"]
        return prefix + self._ssh_argv()

    def _ssh_argv(self) -> list[str]:
        options = [
            "ExitOnForwardFailure=yes",
            f"ServerAliveInterval={self.keepalive_seconds}",
            "ServerAliveCountMax=3",
            "StrictHostKeyChecking=yes",
            f"UserKnownHostsFile={self.known_hosts_file}",
            "GlobalKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
        ]
        if self.proxy_command:
            options.append(f"ProxyCommand={self.proxy_command}")
        forward = f"{LOOPBACK}:{self.forward_port}:{LOOPBACK}:{self.vm_sshd_port}"
        flags = [part for option in options for part in ("-o", option)]
        destination = [
            "-i",
            str(self.identity_file),
            "-p",
            str(self.relay_port),
            f"{self.relay_user}@{LOOPBACK}",
        ]
        return [find_tool("ssh"), "-N", "-F", "/dev/null", "-R", forward, *flags, *destination]

    def start(self) -> ReverseTunnel:
        """Start the tunnel and wait until the relay's 127.0.0.1:FWD answers with the VM's SSH banner."""
        with open(self.log_file, "ab") as log:
            self._process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if not wait_for_ssh_banner(self.forward_port, self.startup_timeout_seconds, lambda: self.alive):
            self._fail()
        return self

    def stop(self) -> None:
        """Close the tunnel (the relay stops listening on FWD); safe to call twice."""
        if self._process is not None:
            stop_process_tree(self._process)

    def log_tail(self, lines: int = 10) -> str:
        return log_tail(self.log_file, lines)

    def __enter__(self) -> ReverseTunnel:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _fail(self) -> None:
        exited = None if self._process is None else self._process.poll()
        self.stop()
        tail = self.log_tail()
        why = f"exited with code {exited}" if exited is not None else "did not bring up the forward in time"
        problem = f"the VM's reverse tunnel {why}; its log ({self.log_file}) ends:\n{tail}"
        if "forwarding failed" in tail:
            fix = f"the relay must allow this key to listen on 127.0.0.1:{self.forward_port} (permitlisten)"
            raise ForwardRefused(RELAY, f"{LOOPBACK}:{self.forward_port}", problem, fix)
        where = f"{self.relay_user}@{LOOPBACK}:{self.relay_port}"
        raise ConnectError(RELAY, where, problem, "check the relay sshd log and the tunnel key")
