"""Key pairs, known_hosts lines and ssh config files for the sandbox, made with ssh-keygen."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import LOCAL, HopError
from .ports import LOOPBACK
from .tools import find_tool


@dataclass(frozen=True)
class KeyPair:
    """An ed25519 key pair on disk: the private file (0600) and its ``type base64`` public key."""

    private_file: Path
    public_key: str

    @property
    def public_file(self) -> Path:
        return self.private_file.with_name(self.private_file.name + ".pub")


def generate_keypairs(paths: Sequence[Path], *, timeout_seconds: float = 10.0) -> list[KeyPair]:
    """Make an ed25519 key pair at each path (no passphrase), all at once."""
    keygen = find_tool("ssh-keygen")
    runs = [_start_keygen(keygen, Path(path)) for path in paths]
    try:
        for path, run in zip(paths, runs):
            _finish_keygen(Path(path), run, timeout_seconds)
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    return [_load(Path(path)) for path in paths]


def generate_keypair(path: Path) -> KeyPair:
    """Make one ed25519 key pair at ``path``."""
    return generate_keypairs([path])[0]


def _start_keygen(keygen: str, path: Path) -> subprocess.Popen[str]:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".pub").unlink(missing_ok=True)
    argv = [keygen, "-t", "ed25519", "-N", "", "-q", "-C", path.name, "-f", str(path)]
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _finish_keygen(path: Path, run: subprocess.Popen[str], timeout_seconds: float) -> None:
    _, problem = run.communicate(timeout=timeout_seconds)
    if run.returncode != 0:
        fix = f"check that {path.parent} exists and is writable"
        raise HopError(LOCAL, str(path), f"ssh-keygen failed: {problem.strip()}", fix)


def _load(path: Path) -> KeyPair:
    os.chmod(path, 0o600)
    key_type, key_base64 = path.with_name(path.name + ".pub").read_text().split()[:2]
    return KeyPair(private_file=path, public_key=f"{key_type} {key_base64}")


def host_pattern(port: int, host: str = LOOPBACK) -> str:
    """How OpenSSH names ``host:port`` in known_hosts: bare on port 22, ``[host]:port`` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def known_hosts_line(port: int, public_key: str, host: str = LOOPBACK) -> str:
    """One known_hosts line for a server on ``host:port``."""
    return f"{host_pattern(port, host)} {public_key}"


def authorized_key_line(public_key: str, options: str = "", comment: str = "") -> str:
    """One authorized_keys line: ``[options ]type base64[ comment]``."""
    return " ".join(part for part in (options, public_key, comment) if part)


def write_lines(path: Path, lines: Sequence[str], mode: int = 0o644) -> Path:
    """Write ``lines`` (one per line) to ``path`` with ``mode``."""
    path.write_text("".join(f"{line}\n" for line in lines))
    os.chmod(path, mode)
    return path


@dataclass(frozen=True)
class SshHost:
    """One ``Host`` block of an ssh config file."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_file: Path
    known_hosts_file: Path
    proxy_jump: str | None = None

    def render(self) -> str:
        options = {
            "HostName": self.hostname,
            "Port": str(self.port),
            "User": self.user,
            "IdentityFile": quote_if_spaced(str(self.identity_file)),
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": quote_if_spaced(str(self.known_hosts_file)),
            "StrictHostKeyChecking": "yes",
            "BatchMode": "yes",
        }
        if self.proxy_jump:
            options["ProxyJump"] = self.proxy_jump
        return f"Host {self.alias}\n" + "".join(f"    {key} {value}\n" for key, value in options.items())


def quote_if_spaced(value: str) -> str:
    """Quote a config value that holds whitespace (OpenSSH config files accept double quotes)."""
    return f'"{value}"' if any(char.isspace() for char in value) else value


def write_ssh_config(path: Path, hosts: Sequence[SshHost]) -> Path:
    """Write an ssh config file (0644) with one Host block per entry."""
    return write_lines(path, ["\n".join(host.render() for host in hosts)])
