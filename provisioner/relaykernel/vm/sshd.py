"""The VM's sshd, bound to 127.0.0.1 only: our own instance when root, else the one already running (stdlib only)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import VM, VMSetupError
from .keys import KeyPair
from .private import private_dir, tighten_tree, write_private

LOOPBACK = "127.0.0.1"
_START_SECONDS = 10.0
_BANNER_SECONDS = 3.0


@dataclass(frozen=True)
class SshdInfo:
    """Where the VM's sshd listens and which host key it shows; ``managed`` when relaykernel runs it."""

    port: int
    host_public_key: str
    managed: bool


def ensure_sshd(*, state_dir: Path, port: int, authorized_keys: list[str], host_key: KeyPair | None) -> SshdInfo:
    """Root: run our sshd (installed if absent) with the stable host key. Otherwise reuse the running one."""
    if os.geteuid() == 0:
        assert host_key is not None
        return _own_sshd(state_dir, port, authorized_keys, host_key)
    return _running_sshd(port, authorized_keys)


def _own_sshd(state_dir: Path, port: int, authorized_keys: list[str], host_key: KeyPair) -> SshdInfo:
    binary = _sshd_binary()
    keys_file = write_private(state_dir / "authorized_keys", "".join(f"{line}\n" for line in authorized_keys))
    config = write_private(state_dir / "sshd_config", _config_text(state_dir, port, host_key, keys_file))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    check = subprocess.run([binary, "-t", "-f", str(config)], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise VMSetupError(VM, "sshd", f"refused its config: {check.stderr.strip()}", f"see {config}")
    pid = _running_pid(state_dir / "sshd.pid")
    if pid:
        os.kill(pid, signal.SIGHUP)  # re-read the config and keys; connections in progress stay up
    else:
        _start(binary, config, state_dir / "sshd.log", port)
    tighten_tree(state_dir)  # sshd writes its pid file with the default umask
    return SshdInfo(port, host_key.public_key, managed=True)


def _config_text(state_dir: Path, port: int, host_key: KeyPair, keys_file: Path) -> str:
    lines = [
        f"Port {port}", f"ListenAddress {LOOPBACK}", f"HostKey {host_key.private_file}",
        f"PidFile {state_dir / 'sshd.pid'}", f"AuthorizedKeysFile {keys_file} .ssh/authorized_keys",
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", f"UsePAM {'yes' if Path('/etc/pam.d/sshd').exists() else 'no'}",
        "AllowTcpForwarding local", "AllowAgentForwarding no", "X11Forwarding no", "PermitTunnel no",
        "ClientAliveInterval 15", "ClientAliveCountMax 4", "PrintMotd no", "Subsystem sftp internal-sftp",
    ]
    return "".join(f"{line}\n" for line in lines)


def _sshd_binary() -> str:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if found:
        return found
    if not shutil.which("apt-get"):
        raise VMSetupError(VM, "sshd", "OpenSSH's sshd is not installed and there is no apt-get",
                           "install openssh-server with the VM's package manager")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "openssh-server"]):
        done = subprocess.run(step, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            raise VMSetupError(VM, "sshd", f"{' '.join(step)} failed: {done.stderr.strip()[-500:]}",
                               "install openssh-server by hand, then run the cell again")
    return shutil.which("sshd") or "/usr/sbin/sshd"


def _start(binary: str, config: Path, log_file: Path, port: int) -> None:
    write_private(log_file, log_file.read_bytes() if log_file.exists() else b"")  # sshd -E appends, keeps the mode
    started = subprocess.run([binary, "-f", str(config), "-E", str(log_file)], capture_output=True, text=True,
                             timeout=30)  # sshd detaches once it listens
    if started.returncode != 0 or not _wait_for_banner(port, _START_SECONDS):
        tail = log_file.read_text(errors="replace").strip().splitlines()[-3:] if log_file.exists() else []
        raise VMSetupError(VM, f"sshd on {LOOPBACK}:{port}", f"did not start: {started.stderr.strip() or tail}",
                           f"is port {port} taken? (ss -ltnp) Pick another with --sshd-port")


def _running_sshd(port: int, authorized_keys: list[str]) -> SshdInfo:
    if not _wait_for_banner(port, _BANNER_SECONDS):
        raise VMSetupError(VM, f"sshd on {LOOPBACK}:{port}", "nothing answers, and only root can start sshd",
                           "start the platform's sshd, or name the port it uses with --sshd-port")
    _authorize_for_user(authorized_keys)
    return SshdInfo(port, _scan_host_key(port), managed=False)


def _authorize_for_user(lines: list[str]) -> None:
    """Add missing lines to ~/.ssh/authorized_keys (0600 in a 0700 ~/.ssh, as sshd's StrictModes wants)."""
    ssh_dir = private_dir(Path.home() / ".ssh")
    keys_file = ssh_dir / "authorized_keys"
    present = keys_file.read_text().splitlines() if keys_file.exists() else []
    missing = [line for line in lines if line not in present]
    if missing:
        with open(os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as handle:
            handle.write("".join(f"{line}\n" for line in missing))
    keys_file.chmod(0o600)


def _scan_host_key(port: int) -> str:
    scan = subprocess.run(["ssh-keyscan", "-p", str(port), "-t", "ed25519,ecdsa,rsa", LOOPBACK],
                          capture_output=True, text=True, timeout=30)
    lines = [line.split(None, 1)[1] for line in scan.stdout.splitlines() if line and not line.startswith("#")]
    if not lines:
        raise VMSetupError(VM, f"sshd on {LOOPBACK}:{port}", "showed no host key to ssh-keyscan",
                           "check that it is an OpenSSH server")
    return lines[0].strip()


def _wait_for_banner(port: int, timeout_seconds: float) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0) as sock:
                if sock.recv(4) == b"SSH-":
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _running_pid(pid_file: Path) -> int:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return 0
    return pid


def stop_own_sshd(state_dir: Path) -> None:
    """Stop the sshd relaykernel started (its sessions, and kernels under their leases, live on)."""
    pid = _running_pid(state_dir / "sshd.pid")
    if pid:
        os.kill(pid, signal.SIGTERM)
