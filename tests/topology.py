"""NetnsTopology: the sandbox with the VM in its own network namespace, as its own user (root only)."""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
import time
import warnings
from pathlib import Path

from relaykernel.common.errors import VM
from relaykernel.sandbox.keys import KeyPair
from relaykernel.sandbox.processes import descendants, stop_process_tree, terminate_all, wait_gone
from relaykernel.sandbox.sshd import SshdServer
from relaykernel.sandbox.tools import find_tool
from relaykernel.sandbox.topology import LoopbackSandbox, SandboxInfo, TunnelRoute
from relaykernel.sandbox.tunnel import ReverseTunnel

VM_USER = "rkvm"
RELAY_USER = "rkrelay"
VM_PYTHON = "/usr/bin/python3"  # Debian's, with apt's python3-ipykernel: what rkvm can run
_SOCKET_WAIT_SECONDS = 3.0


class LeftoverProcessWarning(UserWarning):
    """Something was still running on the VM when the topology stopped (a leaked kernel, say)."""


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def ensure_user(name: str) -> None:
    """Create ``name`` if missing, with a home and bash, and a password field sshd does not call locked."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        _run(["useradd", "--create-home", "--shell", "/bin/bash", name])
    if _shadow_field(name).startswith("!"):
        _run(["usermod", "-p", "*", name])


def _shadow_field(name: str) -> str:
    for line in Path("/etc/shadow").read_text().splitlines():
        user, _, rest = line.partition(":")
        if user == name:
            return rest.partition(":")[0]
    return ""


def _describe(pid: int) -> str:
    try:
        owner = pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, KeyError):
        return f"{pid} (gone)"
    return f"{pid} {owner}: {command.strip()}"


class NetnsTopology(LoopbackSandbox):
    """The VM sshd on 127.0.0.1:22 of a fresh netns as rkvm; its tunnel reaches the relay by a unix socket."""

    def __init__(self, *, keep: bool = False, startup_timeout_seconds: float = 5.0) -> None:
        super().__init__(keep=keep, startup_timeout_seconds=startup_timeout_seconds)
        self.netns = f"rk-{secrets.token_hex(4)}"
        self.leftover_processes: list[str] = []
        self.bridge: subprocess.Popen[bytes] | None = None  # socat: its children carry the VM tunnel's connections

    @property
    def relay_user(self) -> str:
        return RELAY_USER

    @property
    def vm_user(self) -> str:
        return VM_USER

    @property
    def vm_python(self) -> str:
        return VM_PYTHON

    def _netns_name(self) -> str | None:
        return self.netns

    def _build(self) -> SandboxInfo:
        for name in (RELAY_USER, VM_USER):
            ensure_user(name)
        _run(["ip", "netns", "add", self.netns])
        self._stops.append(self._delete_netns)
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        return super()._build()

    def _make_state_dir(self) -> None:
        super()._make_state_dir()
        self.state_dir.chmod(0o755)  # rkvm reads its key and connects to the socket in here

    def _make_keys(self) -> tuple[KeyPair, KeyPair]:
        laptop, tunnel = super()._make_keys()
        account = pwd.getpwnam(VM_USER)
        for path in (tunnel.private_file, tunnel.public_file):
            os.chown(path, account.pw_uid, account.pw_gid)
        return laptop, tunnel

    def _sshd_for_vm(self, port: int, lines: list[str]) -> SshdServer:
        return SshdServer(
            state_dir=self.state_dir / "vm/sshd",
            authorized_keys={VM_USER: lines},
            netns=self.netns,
            listen_port=22,
            hop=VM,
            startup_timeout_seconds=self.startup_timeout_seconds,
        )

    def _tunnel_route(self) -> TunnelRoute:
        socket_path = self._start_bridge()
        proxy = f"{find_tool('socat')} - UNIX-CONNECT:{socket_path}"
        return TunnelRoute(netns=self.netns, run_as=VM_USER, proxy_command=proxy)

    def _start_tunnel(self, key: KeyPair, forward_port: int) -> ReverseTunnel:
        tunnel = super()._start_tunnel(key, forward_port)
        self._stops.append(self._report_leftovers)  # runs first on stop: see what the tests left behind
        return tunnel

    def _start_bridge(self) -> Path:
        """socat in the root namespace: the relay's TCP port, offered to the VM as a unix socket."""
        assert self.relay_sshd is not None
        socket_path = self.state_dir / "relay.sock"
        listen = f"UNIX-LISTEN:{socket_path},fork,mode=0666"
        argv = [find_tool("socat"), listen, f"TCP:127.0.0.1:{self.relay_sshd.port},nodelay"]
        with open(self.state_dir / "relay/socat.log", "ab") as log:
            self.bridge = bridge = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._stops.append(lambda: stop_process_tree(bridge))
        if not _wait_for_path(socket_path, bridge):
            raise RuntimeError(f"socat did not create {socket_path}; see {self.state_dir}/relay/socat.log")
        return socket_path

    def _expected_pids(self) -> set[int]:
        """The VM sshd listener and the tunnel's process tree; anything else in the netns is a leftover."""
        expected = {self.vm_sshd.pid} if self.vm_sshd and self.vm_sshd.pid else set()
        if self.tunnel and self.tunnel.pid:
            expected.update([self.tunnel.pid, *descendants(self.tunnel.pid)])
        return expected

    def _report_leftovers(self) -> None:
        unexpected = [pid for pid in self._netns_pids() if pid not in self._expected_pids()]
        leftovers = wait_gone(unexpected, 1.0)  # let closing ssh sessions finish first
        if leftovers:
            self.leftover_processes = [_describe(pid) for pid in leftovers]
            listing = "\n  ".join(self.leftover_processes)
            warnings.warn(f"still running on the VM at stop (killed):\n  {listing}", LeftoverProcessWarning, 2)

    def _netns_pids(self) -> list[int]:
        listing = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=10)
        return [int(pid) for pid in listing.stdout.split()]

    def _delete_netns(self) -> None:
        remaining = self._netns_pids()
        terminate_all(remaining)
        wait_gone(remaining, 2.0)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=10, check=False)


def _wait_for_path(path: Path, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + _SOCKET_WAIT_SECONDS
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return path.exists()
