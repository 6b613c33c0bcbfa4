"""The demo's VM in a network namespace of its own (root only): only loopback, its own hostname, the relay by tunnel."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from ..common.errors import VM
from .processes import stop_process_tree, terminate_all, wait_gone
from .sshd import SshdServer
from .tools import find_tool
from .topology import LoopbackSandbox, SandboxInfo, TunnelRoute

VM_HOSTNAME = "relaykernel-demo-vm"
_TOOLS = ("ip", "unshare", "socat")
_SOCKET_WAIT_SECONDS = 3.0


def why_not_available() -> str | None:
    """Why this machine cannot give the VM a namespace of its own, or None when it can."""
    if os.geteuid() != 0:
        return "not root"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} missing (apt-get install iproute2 util-linux socat)"
    probe = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True, timeout=10, check=False)
    return None if probe.returncode == 0 else "namespaces do not work here"


class NamespaceSandbox(LoopbackSandbox):
    """The relay on loopback; the VM's sshd and tunnel in a fresh network namespace, reaching the relay only
    through a unix-socket bridge (socat), and its sessions under the hostname VM_HOSTNAME."""

    def __init__(self, *, keep: bool = False, startup_timeout_seconds: float = 5.0) -> None:
        super().__init__(keep=keep, startup_timeout_seconds=startup_timeout_seconds)
        self.netns = f"rkdemo-{secrets.token_hex(4)}"

    def _build(self) -> SandboxInfo:
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True, timeout=30)
        self._stops.append(self._delete_netns)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True, capture_output=True,
                       timeout=30)
        return super()._build()

    def _netns_name(self) -> str | None:
        return self.netns

    def _sshd_for_vm(self, port: int, lines: list[str]) -> SshdServer:
        return SshdServer(state_dir=self.state_dir / "vm/sshd", authorized_keys={self.vm_user: lines},
                          netns=self.netns, listen_port=22, hop=VM, hostname=VM_HOSTNAME,
                          startup_timeout_seconds=self.startup_timeout_seconds)

    def _tunnel_route(self) -> TunnelRoute:
        assert self.relay_sshd is not None
        socket_path = self.state_dir / "relay.sock"
        bridge = start_socket_bridge(socket_path, self.relay_sshd.port, self.state_dir / "relay/socat.log")
        self._stops.append(lambda: stop_process_tree(bridge))
        return TunnelRoute(netns=self.netns, proxy_command=f"{find_tool('socat')} - UNIX-CONNECT:{socket_path}")

    def _delete_netns(self) -> None:
        delete_netns(self.netns)


def start_socket_bridge(socket_path: Path, relay_port: int, log_file: Path, mode: str = "0600") -> subprocess.Popen:
    """socat offering the relay's 127.0.0.1:RELAY_PORT as a unix socket (a namespace's only way out)."""
    argv = [find_tool("socat"), f"UNIX-LISTEN:{socket_path},fork,mode={mode}", f"TCP:127.0.0.1:{relay_port},nodelay"]
    with open(log_file, "ab") as log:
        bridge = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    deadline = time.monotonic() + _SOCKET_WAIT_SECONDS
    while not socket_path.exists() and bridge.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if not socket_path.exists():
        stop_process_tree(bridge)
        raise RuntimeError(f"socat did not create {socket_path}; see {log_file}")
    return bridge


def netns_pids(netns: str) -> list[int]:
    listing = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10)
    return [int(pid) for pid in listing.stdout.split()]


def delete_netns(netns: str) -> None:
    """End whatever still runs in NETNS, then delete it."""
    remaining = netns_pids(netns)
    terminate_all(remaining)
    wait_gone(remaining, 2.0)
    subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10, check=False)
