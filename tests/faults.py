"""Fault injectors on the test topology: hangs, resets and restarts of each leg, each bounded and undone on exit.

Every fault is a context manager (or ``start()``/``end()``): it begins on enter and is undone on exit, or after
``max_seconds`` at the latest, whatever the body does. Hangs hold bytes with the connections left open (the link
emulator's blackhole, SIGSTOP of the process carrying a leg, or nftables dropping one connection's packets, which
also brings TCP's own retransmission back-off); resets close connections; restarts stop a process and start it again.
The laptop leg is the laptop↔relay connection, the VM leg the VM tunnel's connection to the relay.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from linkemu import LinkEmulator
from relaykernel.common.errors import HopError
from relaykernel.sandbox.processes import descendants, signal_all, wait_gone
from relaykernel.sandbox.topology import LoopbackSandbox
from relaykernel.sandbox.tunnel import ReverseTunnel

ESTABLISHED = "01"
DEFAULT_MAX_SECONDS = 300.0
NFT_TABLE_PREFIX = "rkfault"


class Fault:
    """Begins on ``start()``/enter, undone once on ``end()``/exit or after ``max_seconds``, whichever comes first."""

    def __init__(self, *, max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
        self.max_seconds = max_seconds
        self._lock = threading.Lock()
        self._active = False
        self._timer: threading.Timer | None = None

    def start(self) -> Fault:
        with self._lock:
            self._begin()
            self._active = True
        self._timer = threading.Timer(self.max_seconds, self.end)
        self._timer.name = f"fault-guard-{type(self).__name__}"
        self._timer.daemon = True
        self._timer.start()
        return self

    def end(self) -> None:
        """Undo the fault; safe to call twice and from the guard timer."""
        timer = self._timer
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
            timer.join()
        with self._lock:
            if self._active:
                self._active = False
                self._finish()

    def __enter__(self) -> Fault:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.end()

    def _begin(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError


# ---- the laptop leg through the link emulator ------------------------------------------------------------------


class Blackhole(Fault):
    """The emulated laptop↔relay link holds every byte both ways; connections stay open."""

    def __init__(self, emulator: LinkEmulator, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.emulator = emulator

    def _begin(self) -> None:
        self.emulator.blackhole(True)

    def _finish(self) -> None:
        self.emulator.blackhole(False)


def reset_laptop_leg(emulator: LinkEmulator) -> None:
    """Close every laptop↔relay connection at once (a killed transport, a dropped NAT mapping)."""
    emulator.reset()


# ---- hangs by process: SIGSTOP what carries a leg --------------------------------------------------------------


class Stopped(Fault):
    """SIGSTOP the given processes, SIGCONT them at the end (those that still exist)."""

    def __init__(self, pids: list[int], what: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not pids:
            raise RuntimeError(f"nothing to stop: no process carries {what}")
        self.pids = pids
        self.what = what

    def _begin(self) -> None:
        signal_all(self.pids, signal.SIGSTOP)

    def _finish(self) -> None:
        signal_all(self.pids, signal.SIGCONT)


def hang_relay_session(sandbox: LoopbackSandbox, **kwargs: Any) -> Stopped:
    """The laptop leg hangs: the relay sshd processes serving laptop connections are stopped."""
    legs = relay_connections(sandbox)
    return Stopped([pid for pid, port in legs if port not in vm_leg_ports(sandbox)], "a laptop leg", **kwargs)


def hang_vm_bridge(sandbox: LoopbackSandbox, **kwargs: Any) -> Stopped:
    """The VM leg hangs: the socat bridge child carrying the VM tunnel (loopback sandbox: the tunnel's ssh) stops."""
    return Stopped(sorted(vm_leg_carriers(sandbox)), "the VM leg", **kwargs)


class VmLegHang(Stopped):
    """The whole VM leg hangs, new connections too: the socat bridge and its children stop (loopback sandbox: the
    tunnel's ssh). The VM's tunnel may give up meanwhile (its keepalive); at the end it is started again, as the VM's
    keeper would, which keeps retrying and so gets through as soon as the leg is back."""

    def __init__(self, sandbox: LoopbackSandbox, **kwargs: Any) -> None:
        bridge = getattr(sandbox, "bridge", None)
        assert sandbox.tunnel is not None and sandbox.tunnel.pid is not None, "the sandbox is not running"
        root = bridge.pid if bridge is not None else sandbox.tunnel.pid
        super().__init__([root, *descendants(root)], "the VM leg", **kwargs)
        self.tunnel = sandbox.tunnel

    def _finish(self) -> None:
        super()._finish()
        bring_tunnel_back(self.tunnel)


def bring_tunnel_back(tunnel: ReverseTunnel, timeout_seconds: float = 60.0) -> None:
    """Start the VM's tunnel again unless it runs, retrying while the relay still holds the old forward."""
    deadline = time.monotonic() + timeout_seconds
    while not tunnel.alive:
        try:
            tunnel.stop()
            tunnel.start()
        except HopError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# ---- hangs by packet loss: nftables drops one connection's packets ---------------------------------------------


class DropPackets(Fault):
    """nftables drops every packet between two loopback ports (both ways); TCP retransmits with back-off."""

    def __init__(self, port_pairs: list[tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not port_pairs:
            raise RuntimeError("no connection to drop packets of")
        self.port_pairs = port_pairs
        self.table = f"{NFT_TABLE_PREFIX}{secrets.token_hex(4)}"

    def _begin(self) -> None:
        rules = [f"add table inet {self.table}",
                 f"add chain inet {self.table} out {{ type filter hook output priority 0 ; }}"]
        for one, other in self.port_pairs:
            for sport, dport in ((one, other), (other, one)):
                rules.append(f"add rule inet {self.table} out ip saddr 127.0.0.1 tcp sport {sport} "
                             f"tcp dport {dport} drop")
        try:
            _nft("\n".join(rules))
        except BaseException:
            _nft(f"delete table inet {self.table}", check=False)
            raise

    def _finish(self) -> None:
        _nft(f"delete table inet {self.table}")


def drop_vm_leg(sandbox: LoopbackSandbox, **kwargs: Any) -> DropPackets:
    """The VM leg blackholed by packet loss: the tunnel's connection to the relay sshd."""
    relay_port = _relay_port(sandbox)
    return DropPackets([(port, relay_port) for port in sorted(vm_leg_ports(sandbox))], **kwargs)


def drop_laptop_leg(sandbox: LoopbackSandbox, **kwargs: Any) -> DropPackets:
    """The laptop leg blackholed by packet loss: every laptop connection to the relay sshd."""
    vm_ports, relay_port = vm_leg_ports(sandbox), _relay_port(sandbox)
    pairs = sorted({(port, relay_port) for _, port in relay_connections(sandbox) if port not in vm_ports})
    return DropPackets(pairs, **kwargs)


def nft_tables_left() -> list[str]:
    """Tables of ours still in nftables (there should be none)."""
    listing = _nft("list tables", check=False)
    return [line.split()[-1] for line in listing.splitlines() if NFT_TABLE_PREFIX in line]


def _nft(script: str, check: bool = True) -> str:
    result = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=10, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"nft failed ({result.returncode}): {result.stderr.strip()}\n{script}")
    return result.stdout


# ---- restarts --------------------------------------------------------------------------------------------------


class TunnelDown(Fault):
    """The VM's tunnel ssh is killed at the start and started again at the end (as the VM's keeper would)."""

    def __init__(self, sandbox: LoopbackSandbox, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        assert sandbox.tunnel is not None, "the sandbox is not running"
        self.tunnel = sandbox.tunnel

    def _begin(self) -> None:
        self.tunnel.stop()

    def _finish(self) -> None:
        self.tunnel.start()


class RelayDown(Fault):
    """The relay sshd and every session on it stop (a relay reboot); at the end it starts again on the same port and
    key, and the VM's tunnel, which lost its connection, is started again as the VM's keeper would."""

    def __init__(self, sandbox: LoopbackSandbox, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        assert sandbox.relay_sshd is not None and sandbox.tunnel is not None, "the sandbox is not running"
        self.relay = sandbox.relay_sshd
        self.tunnel = sandbox.tunnel

    def _begin(self) -> None:
        self.relay.stop()

    def _finish(self) -> None:
        self.relay.start()
        self.tunnel.stop()
        bring_tunnel_back(self.tunnel)


# ---- finding who carries a leg, from /proc ---------------------------------------------------------------------


def tcp_connections() -> dict[int, tuple[int, int]]:
    """Established IPv4 TCP sockets of this namespace: inode → (local port, remote port)."""
    found: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == ESTABLISHED:
            local, remote = (int(address.rpartition(":")[2], 16) for address in fields[1:3])
            found[int(fields[9])] = (local, remote)
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def connections_of(pids: list[int]) -> list[tuple[int, int, int]]:
    """(pid, local port, remote port) for each established TCP socket the processes hold."""
    table = tcp_connections()
    return [(pid, *table[inode]) for pid in pids for inode in socket_inodes(pid) if inode in table]


def relay_connections(sandbox: LoopbackSandbox) -> list[tuple[int, int]]:
    """(relay sshd process, client's port) for each connection the relay serves (laptop and VM alike)."""
    assert sandbox.relay_sshd is not None and sandbox.relay_sshd.pid is not None
    relay_port = _relay_port(sandbox)
    held = connections_of(descendants(sandbox.relay_sshd.pid))
    return [(pid, remote) for pid, local, remote in held if local == relay_port]


def vm_leg_carriers(sandbox: LoopbackSandbox) -> set[int]:
    """The processes holding the VM tunnel's connection to the relay (socat bridge children, or the tunnel ssh)."""
    bridge = getattr(sandbox, "bridge", None)
    if bridge is not None:
        roots = descendants(bridge.pid)
    else:
        assert sandbox.tunnel is not None and sandbox.tunnel.pid is not None
        roots = [sandbox.tunnel.pid, *descendants(sandbox.tunnel.pid)]
    relay_port = _relay_port(sandbox)
    return {pid for pid, _, remote in connections_of(roots) if remote == relay_port}


def vm_leg_ports(sandbox: LoopbackSandbox) -> set[int]:
    """The local ports of the VM tunnel's connections to the relay."""
    relay_port = _relay_port(sandbox)
    return {local for _, local, remote in connections_of(sorted(vm_leg_carriers(sandbox))) if remote == relay_port}


def stopped_processes(pids: list[int]) -> list[int]:
    """Those of ``pids`` left in the stopped state (there should be none after a fault)."""
    stopped = []
    for pid in wait_gone(pids, 0):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("T", "t"):
                stopped.append(pid)
    return stopped


def _relay_port(sandbox: LoopbackSandbox) -> int:
    assert sandbox.relay_sshd is not None
    return sandbox.relay_sshd.port
