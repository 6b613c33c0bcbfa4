"""What the heartbeat cell shows: tunnel, kernels and their leases, GPU, time left on the runtime (stdlib only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..common.protocol import CONTROL_SOCKET
from .tunnel import TunnelState

_PEEK_SECONDS = 1.0


@dataclass
class KernelLease:
    """One kernel under a supervisor: its pid, and how long since a client last renewed its lease."""

    kernel_id: str
    pid: int
    alive: bool
    since_renewal_seconds: float
    lease_seconds: float


@dataclass
class VMStatus:
    """One snapshot of everything the cell reports."""

    at: float
    platform: str
    relay: str
    remote_port: int
    tunnel: TunnelState
    kernels: list[KernelLease] = field(default_factory=list)
    gpu: str = ""
    runtime_left_seconds: float | None = None
    checkpoint: str = ""

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def as_text(self, platform_title: str, log_file: Path) -> str:
        """A few aligned lines, the same every time so an updated display does not jump."""
        clock = time.strftime("%H:%M:%S", time.localtime(self.at))
        tunnel = f"{self.tunnel.status} since {time.strftime('%H:%M:%S', time.localtime(self.tunnel.since))}"
        tunnel += f" ({_duration(self.at - self.tunnel.since)})"
        if self.tunnel.restarts:
            tunnel += f", {self.tunnel.restarts} restart(s)"
        lines = [
            f"relaykernel on {platform_title} at {clock}; interrupt this cell to take the tunnel down",
            f"tunnel   {tunnel} -> {self.relay}, relay port {self.remote_port}",
            f"         {self.tunnel.detail}" if self.tunnel.detail else "",
            f"kernels  {_kernels(self.kernels)}",
            f"GPU      {self.gpu or 'none visible (no nvidia-smi)'}",
            f"runtime  {_runtime(self.runtime_left_seconds)}",
            f"saved    {self.checkpoint}" if self.checkpoint else "",
            f"log      {log_file}",
        ]
        return "\n".join(line for line in lines if line)


def kernel_leases(run_root: str) -> list[KernelLease]:
    """Every kernel with a live supervisor under run_root, peeked at (a peek does not renew the lease)."""
    root = Path(os.path.expanduser(run_root))
    leases = []
    for run_dir in sorted(root.glob("*/")) if root.is_dir() else []:
        status = _peek(run_dir / CONTROL_SOCKET)
        if status:
            left, total = float(status.get("lease_left_seconds", 0)), float(status.get("lease_seconds", 0))
            leases.append(KernelLease(run_dir.name, int(status.get("pid", 0)), bool(status.get("alive")),
                                      round(max(0.0, total - left), 1), total))
    return leases


def gpu_summary() -> str:
    """'Tesla T4, 12% busy, 1024/15360 MiB' per GPU, or '' without nvidia-smi."""
    query = ["nvidia-smi", "--query-gpu=name,utilization.gpu,memory.used,memory.total",
             "--format=csv,noheader,nounits"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    gpus = []
    for line in result.stdout.strip().splitlines():
        name, busy, used, total = (part.strip() for part in line.split(","))
        gpus.append(f"{name}, {busy}% busy, {used}/{total} MiB")
    return "; ".join(gpus)


def runtime_left_seconds(limit_hours: float | None) -> float | None:
    """The platform's limit minus the age of this container (its PID 1), or None where no limit is known."""
    if limit_hours is None:
        return None
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        started_ticks = int(Path("/proc/1/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    age = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    return max(0.0, limit_hours * 3600 - age)


def _peek(control_socket: Path) -> dict | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(_PEEK_SECONDS)
            sock.connect(str(control_socket))
            sock.sendall(b'{"op": "peek"}\n')
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None
    event = json.loads(reply.splitlines()[0])
    return event if event.get("event") == "status" else None


def _kernels(kernels: list[KernelLease]) -> str:
    if not kernels:
        return "none running"
    parts = [f"pid {k.pid} {'up' if k.alive else 'ending'}, renewed {_duration(k.since_renewal_seconds)} ago "
             f"(lease {_duration(k.lease_seconds)})" for k in kernels]
    return f"{len(kernels)} running: " + "; ".join(parts)


def _runtime(left: float | None) -> str:
    return "no limit known" if left is None else f"about {_duration(left)} left before the platform's limit"


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
