"""A relay and a notebook VM on loopback, as the current user: what ``relaykernel demo`` runs against."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..common.errors import RELAY, VM
from ..common.relay_keys import laptop_key_line, relay_sshd_config, tunnel_key_line
from .keys import KeyPair, SshHost, authorized_key_line, generate_keypairs, write_lines, write_ssh_config
from .ports import LOOPBACK, free_loopback_ports
from .processes import descendants, terminate_all
from .sshd import SshdServer
from .tunnel import ReverseTunnel

RELAY_ALIAS = "relaykernel-sandbox-relay"
VM_ALIAS = "relaykernel-sandbox-vm"


@dataclass(frozen=True)
class SandboxInfo:
    """Everything a client needs to reach the sandbox VM through its relay, and a way to look at the VM."""

    relay: str
    vm: str
    vm_alias: str
    relay_alias: str
    ssh_config_file: str
    identity_file: str
    known_hosts_file: str
    vm_python: str
    vm_user: str
    relay_user: str
    relay_port: int
    forward_port: int
    vm_sshd_port: int
    state_dir: str
    netns: str | None = None

    def vm_run(self, argv: Sequence[str], *, timeout_seconds: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on the VM side (as the VM user, in its namespace); output captured as text."""
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        cwd = None
        if self.vm_user != current_user():
            account = pwd.getpwnam(self.vm_user)
            # setpriv execs in place; runuser would stay as a parent whose argv matches `pgrep -f` patterns.
            prefix += ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups"]
            prefix += ["--reset-env", "--"]
            cwd = account.pw_dir
        return subprocess.run(
            prefix + list(argv), capture_output=True, text=True, timeout=timeout_seconds, check=False, cwd=cwd
        )


@dataclass(frozen=True)
class TunnelRoute:
    """How the VM's tunnel reaches the relay: its namespace, its user, and a ProxyCommand if not by TCP."""

    netns: str | None = None
    run_as: str | None = None
    proxy_command: str | None = None


def current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def relay_authorized_keys(laptop_key: str, vm_tunnel_key: str, forward_port: int) -> list[str]:
    """The documented relay authorized_keys: the laptop may only reach FWD, the VM may only listen on it."""
    return [
        laptop_key_line(laptop_key, [forward_port], "laptop"),
        tunnel_key_line(vm_tunnel_key, forward_port, "vm-tunnel"),
    ]


class LoopbackSandbox:
    """Relay sshd, VM sshd and the VM's reverse tunnel, all on 127.0.0.1 as the current user (no root)."""

    def __init__(
        self, *, state_dir: Path | str | None = None, keep: bool = False, startup_timeout_seconds: float = 5.0
    ) -> None:
        self._requested_state_dir = state_dir
        self.keep = keep
        self.startup_timeout_seconds = startup_timeout_seconds
        self.state_dir = Path()
        self._info: SandboxInfo | None = None
        self._stops: list[Callable[[], None]] = []
        self.relay_sshd: SshdServer | None = None
        self.vm_sshd: SshdServer | None = None
        self.tunnel: ReverseTunnel | None = None

    @property
    def info(self) -> SandboxInfo:
        if self._info is None:
            raise RuntimeError("the sandbox is not running: call start() first")
        return self._info

    def start(self) -> SandboxInfo:
        """Start relay, VM and tunnel; on any failure stop what did start and re-raise."""
        try:
            self._info = self._build()
        except BaseException:
            self.stop()
            raise
        return self._info

    def stop(self) -> None:
        """Stop everything in reverse order of starting and remove the state dir (unless keep); idempotent."""
        # Sessions on the VM outlive their sshd once the tunnel closes: note them now, end them last.
        sessions = self._server_descendants()
        try:
            while self._stops:
                self._stops.pop()()
        finally:
            terminate_all(sessions)
            self._info = None

    def __enter__(self) -> SandboxInfo:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _server_descendants(self) -> list[int]:
        servers = (self.tunnel, self.vm_sshd, self.relay_sshd)
        return [pid for server in servers if server and server.pid for pid in descendants(server.pid)]

    def _build(self) -> SandboxInfo:
        self._make_state_dir()
        relay_port, vm_port, forward_port = free_loopback_ports(3)
        laptop_key, tunnel_key = self._make_keys()
        relay_lines = relay_authorized_keys(laptop_key.public_key, tunnel_key.public_key, forward_port)
        self.relay_sshd = self._sshd_for_relay(relay_port, relay_lines)
        self.vm_sshd = self._sshd_for_vm(vm_port, [authorized_key_line(laptop_key.public_key, comment="laptop")])
        self._start_servers(self.relay_sshd, self.vm_sshd)
        self.tunnel = self._start_tunnel(tunnel_key, forward_port)
        return self._write_laptop_files(laptop_key, forward_port)

    def _make_state_dir(self) -> None:
        if self._requested_state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="relaykernel-sandbox-"))
        else:
            self.state_dir = Path(self._requested_state_dir).absolute()
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self._stops.append(self._remove_state_dir)
        for part in ("laptop", "relay", "vm"):
            (self.state_dir / part).mkdir(exist_ok=True)

    def _remove_state_dir(self) -> None:
        if not self.keep:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _make_keys(self) -> tuple[KeyPair, KeyPair]:
        laptop, tunnel = generate_keypairs([self.state_dir / "laptop/id_ed25519", self.state_dir / "vm/tunnel_key"])
        return laptop, tunnel

    @property
    def relay_user(self) -> str:
        return current_user()

    @property
    def vm_user(self) -> str:
        return current_user()

    @property
    def vm_python(self) -> str:
        return sys.executable

    def _sshd_for_relay(self, port: int, lines: list[str]) -> SshdServer:
        return SshdServer(
            state_dir=self.state_dir / "relay/sshd",
            port=port,
            authorized_keys={self.relay_user: lines},
            extra_config=relay_sshd_config(),
            hop=RELAY,
            startup_timeout_seconds=self.startup_timeout_seconds,
        )

    def _sshd_for_vm(self, port: int, lines: list[str]) -> SshdServer:
        return SshdServer(
            state_dir=self.state_dir / "vm/sshd",
            port=port,
            authorized_keys={self.vm_user: lines},
            hop=VM,
            startup_timeout_seconds=self.startup_timeout_seconds,
        )

    def _start_servers(self, *servers: SshdServer) -> None:
        for server in servers:  # launch all, then wait: the servers come up side by side
            self._stops.append(server.stop)
            server.launch()
        for server in servers:
            server.wait_until_ready()

    def _start_tunnel(self, key: KeyPair, forward_port: int) -> ReverseTunnel:
        assert self.relay_sshd is not None and self.vm_sshd is not None
        known_hosts = write_lines(self.state_dir / "vm/relay_known_hosts", [self.relay_sshd.host_key_line()])
        route = self._tunnel_route()
        tunnel = ReverseTunnel(
            relay_user=self.relay_user,
            relay_port=self.relay_sshd.port,
            forward_port=forward_port,
            vm_sshd_port=self.vm_sshd.port,
            identity_file=key.private_file,
            known_hosts_file=known_hosts,
            log_file=self.state_dir / "vm/tunnel.log",
            startup_timeout_seconds=self.startup_timeout_seconds,
            netns=route.netns,
            run_as=route.run_as,
            proxy_command=route.proxy_command,
        )
        self._stops.append(tunnel.stop)
        return tunnel.start()

    def _tunnel_route(self) -> TunnelRoute:
        """How the VM's tunnel reaches the relay; on plain loopback, directly as the current user."""
        return TunnelRoute()

    def _write_laptop_files(self, key: KeyPair, forward_port: int) -> SandboxInfo:
        assert self.relay_sshd is not None and self.vm_sshd is not None
        laptop = self.state_dir / "laptop"
        known_hosts = write_lines(
            laptop / "known_hosts",
            [self.relay_sshd.host_key_line(), self.vm_sshd.host_key_line(port=forward_port)],
        )
        relay_port = self.relay_sshd.port
        hosts = [
            SshHost(RELAY_ALIAS, LOOPBACK, relay_port, self.relay_user, key.private_file, known_hosts),
            SshHost(VM_ALIAS, LOOPBACK, forward_port, self.vm_user, key.private_file, known_hosts, RELAY_ALIAS),
        ]
        return SandboxInfo(
            relay=f"{self.relay_user}@{LOOPBACK}:{relay_port}",
            vm=f"{self.vm_user}@{LOOPBACK}:{forward_port}",
            vm_alias=VM_ALIAS,
            relay_alias=RELAY_ALIAS,
            ssh_config_file=str(write_ssh_config(laptop / "ssh_config", hosts)),
            identity_file=str(key.private_file),
            known_hosts_file=str(known_hosts),
            vm_python=self.vm_python,
            vm_user=self.vm_user,
            relay_user=self.relay_user,
            relay_port=relay_port,
            forward_port=forward_port,
            vm_sshd_port=self.vm_sshd.port,
            state_dir=str(self.state_dir),
            netns=self._netns_name(),
        )

    def _netns_name(self) -> str | None:
        return None
