"""A throwaway OpenSSH server on 127.0.0.1 (or in a network namespace) with its own config, key and log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Union

from ..common.errors import ConfigError, ConnectError
from .keys import generate_keypair, known_hosts_line, quote_if_spaced, write_lines
from .ports import LOOPBACK, free_loopback_port, wait_for_ssh_banner
from .processes import log_tail, stop_process_tree
from .tools import find_tool

AuthorizedKeys = Union[Mapping[str, Sequence[str]], str]  # per-user lines, or an AuthorizedKeysFile pattern
_PORT_ATTEMPTS = 3
_PRIVSEP_DIR = Path("/run/sshd")


class SshdServer:
    """``/usr/sbin/sshd -D`` with a config written into ``state_dir``; ``start()`` returns once it answers."""

    def __init__(
        self,
        *,
        state_dir: Path | str,
        authorized_keys: AuthorizedKeys,
        port: int = 0,
        netns: str | None = None,
        listen_port: int = 22,
        use_pam: bool = False,
        extra_config: Sequence[str] = (),
        hop: str = "sshd",
        startup_timeout_seconds: float = 5.0,
        hostname: str | None = None,
    ) -> None:
        if not 0 <= port < 65536 or not 0 < listen_port < 65536:
            raise ConfigError(f"sshd port {port}/{listen_port} out of range: use 0 (any free port) or 1-65535")
        if netns and port:
            raise ConfigError(f"sshd in netns {netns} listens on listen_port={listen_port}; leave port unset")
        self.state_dir = Path(state_dir).absolute()
        self.hop = hop
        self.netns = netns
        self.hostname = hostname  # a UTS namespace of its own with this name (root only), inherited by sessions
        self._authorized_keys = authorized_keys
        self._fixed_port = listen_port if netns else port
        self._port = self._fixed_port
        self._use_pam = use_pam
        self._extra_config = list(extra_config)
        self._startup_timeout_seconds = startup_timeout_seconds
        self._process: subprocess.Popen[bytes] | None = None
        self.host_public_key = ""

    @property
    def port(self) -> int:
        """The port sshd listens on (127.0.0.1 of its namespace); 0 until started."""
        return self._port

    @property
    def config_file(self) -> Path:
        return self.state_dir / "sshd_config"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "sshd.log"

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def host_key_line(self, port: int | None = None) -> str:
        """known_hosts line for this server as seen on 127.0.0.1:``port`` (default: its own port)."""
        return known_hosts_line(port or self.port, self.host_public_key)

    def start(self) -> SshdServer:
        """Launch sshd and wait until it answers with an SSH banner."""
        self.launch()
        self.wait_until_ready()
        return self

    def launch(self) -> None:
        """Write keys and config and start sshd without waiting (see ``wait_until_ready``)."""
        sshd = find_tool("sshd")
        self.stop()
        self._prepare_state_dir()
        self._port = self._fixed_port or free_loopback_port()
        self._write_config()
        self._process = self._spawn(sshd)

    def wait_until_ready(self) -> None:
        """Wait for the banner; on a port someone else took meanwhile, retry on another free port."""
        for _ in range(_PORT_ATTEMPTS):
            if self._answers():
                return
            if self._fixed_port or "Address already in use" not in self.log_tail():
                break
            self.stop()
            self.launch()
        self._fail()

    def stop(self) -> None:
        """Stop sshd and every session it is serving; safe to call twice."""
        if self._process is not None:
            stop_process_tree(self._process)

    def log_tail(self, lines: int = 15) -> str:
        return log_tail(self.log_file, lines)

    def __enter__(self) -> SshdServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _prepare_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        host_key = self.state_dir / "ssh_host_ed25519_key"
        if not self.host_public_key:
            self.host_public_key = generate_keypair(host_key).public_key
        if os.geteuid() == 0:
            _PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)

    def _authorized_keys_pattern(self) -> str:
        if isinstance(self._authorized_keys, str):
            return self._authorized_keys
        keys_dir = self.state_dir / "authorized_keys"
        keys_dir.mkdir(exist_ok=True)
        keys_dir.chmod(0o755)  # sshd reads these as the logging-in user
        for user, lines in self._authorized_keys.items():
            if not user or "/" in user:
                raise ConfigError(f"bad user name {user!r} in authorized_keys for the sandbox sshd")
            write_lines(keys_dir / user, list(lines), mode=0o644)
        return f"{keys_dir}/%u"

    def _write_config(self) -> None:
        settings = {
            "ListenAddress": f"{LOOPBACK}:{self._port}",
            "HostKey": quote_if_spaced(str(self.state_dir / "ssh_host_ed25519_key")),
            "PidFile": quote_if_spaced(str(self.state_dir / "sshd.pid")),
            "AuthorizedKeysFile": quote_if_spaced(self._authorized_keys_pattern()),
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "PubkeyAuthentication": "yes",
            "AllowTcpForwarding": "yes",
            "GatewayPorts": "no",
            "StrictModes": "no",
            "UsePAM": "yes" if self._use_pam else "no",
            "LogLevel": "VERBOSE",
            "ClientAliveInterval": "15",
            "PrintMotd": "no",
            "X11Forwarding": "no",
            "MaxStartups": "64",
            "Subsystem": "sftp internal-sftp",
        }
        # sshd keeps the first value it reads for a keyword, so extra lines go first to override ours.
        lines = self._extra_config + [f"{key} {value}" for key, value in settings.items()]
        write_lines(self.config_file, lines)

    def _spawn(self, sshd: str) -> subprocess.Popen[bytes]:
        argv = [sshd, "-D", "-e", "-f", str(self.config_file), "-E", str(self.log_file)]
        with open(self.log_file, "ab") as log:
            # Never a pipe: sshd's session children inherit it and a reader waiting for EOF would hang.
            return subprocess.Popen(_in_netns(self.netns, _named(self.hostname, argv)), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log)

    def _answers(self) -> bool:
        if self.netns is None:
            return wait_for_ssh_banner(self._port, self._startup_timeout_seconds, lambda: self.alive)
        deadline = time.monotonic() + self._startup_timeout_seconds
        while self.alive and time.monotonic() < deadline:
            if _banner_in_netns(self.netns, self._port, min(1.0, deadline - time.monotonic())):
                return True
        return False

    def _fail(self) -> None:
        exited = None if self._process is None else self._process.poll()
        self.stop()
        why = f"sshd exited with code {exited}" if exited is not None else "sshd did not answer in time"
        where = f"{LOOPBACK}:{self._port}" + (f" in netns {self.netns}" if self.netns else "")
        fix = f"read {self.log_file} and {self.config_file}"
        raise ConnectError(self.hop, where, f"sandbox {why}; log tail:\n{self.log_tail()}", fix)


def _in_netns(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def _named(hostname: str | None, argv: list[str]) -> list[str]:
    """ARGV in a UTS namespace of its own called HOSTNAME (unshare and sh exec: the pid stays sshd's)."""
    if not hostname:
        return argv
    return ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *argv]


def _banner_in_netns(netns: str, port: int, timeout_seconds: float) -> bool:
    probe = [sys.executable, "-m", "relaykernel.sandbox.ports", str(port), str(timeout_seconds)]
    try:
        result = subprocess.run(_in_netns(netns, probe), capture_output=True, timeout=timeout_seconds + 5)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0
