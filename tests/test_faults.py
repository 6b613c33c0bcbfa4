"""Each fault injector does what it says to a plain OpenSSH session through the relay, and leaves nothing behind."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from faults import (
    Blackhole,
    DropPackets,
    Fault,
    RelayDown,
    TunnelDown,
    VmLegHang,
    bring_tunnel_back,
    drop_laptop_leg,
    drop_vm_leg,
    hang_relay_session,
    hang_vm_bridge,
    nft_tables_left,
    relay_connections,
    reset_laptop_leg,
    stopped_processes,
    vm_leg_carriers,
)
from linkemu import LinkEmulator, through_link
from relaykernel.sandbox.processes import descendants
from relaykernel.sandbox.topology import LoopbackSandbox, SandboxInfo

STALL_SECONDS = 1.0  # a line must not come back for this long while the fault holds
BACK_SECONDS = 15.0  # ...and must come back within this once it ends (TCP's back-off after packet drops included)


class EchoSession:
    """``ssh VM cat`` through the relay: each line written comes back, unless the path is stuck or gone."""

    def __init__(self, info: SandboxInfo) -> None:
        argv = ["ssh", "-F", info.ssh_config_file, info.vm_alias, "cat"]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.buffer = b""

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.flush()

    def line(self, timeout_seconds: float) -> str | None:
        """The next line back, or None if none came within the timeout (or the session ended)."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_seconds
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def echo(self, text: str, timeout_seconds: float = BACK_SECONDS) -> bool:
        self.send(text)
        return self.line(timeout_seconds) == text

    def ended(self, timeout_seconds: float) -> bool:
        try:
            self.process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=10)


@pytest.fixture(scope="module")
def sandbox(topology_class: type[LoopbackSandbox]) -> Iterator[LoopbackSandbox]:
    """A topology of this module's own: its legs are hung, cut and restarted."""
    own = topology_class()
    own.start()
    yield own
    own.stop()


@pytest.fixture(scope="module")
def link(sandbox: LoopbackSandbox) -> Iterator[LinkEmulator]:
    assert sandbox.relay_sshd is not None
    with LinkEmulator(sandbox.relay_sshd.port, delay_ms=5) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def laptop(sandbox: LoopbackSandbox, link: LinkEmulator, tmp_path_factory: pytest.TempPathFactory) -> SandboxInfo:
    """The sandbox as the laptop sees it: the relay across the emulated link."""
    return through_link(sandbox.info, link, Path(tmp_path_factory.mktemp("laptop")))  # type: ignore[no-any-return]


@pytest.fixture
def session(laptop: SandboxInfo) -> Iterator[EchoSession]:
    opened = EchoSession(laptop)
    assert opened.echo("hello"), "the session does not echo before any fault"
    yield opened
    opened.close()


HANGS: dict[str, Callable[[LoopbackSandbox, LinkEmulator], Fault]] = {
    "laptop-leg-emulator-blackhole": lambda sandbox, link: Blackhole(link),
    "laptop-leg-relay-sshd-stopped": lambda sandbox, link: hang_relay_session(sandbox),
    "laptop-leg-packets-dropped": lambda sandbox, link: drop_laptop_leg(sandbox),
    "vm-leg-bridge-stopped": lambda sandbox, link: hang_vm_bridge(sandbox),
    "vm-leg-packets-dropped": lambda sandbox, link: drop_vm_leg(sandbox),
    "vm-leg-bridge-and-new-connections-stopped": lambda sandbox, link: VmLegHang(sandbox),
}


@pytest.mark.parametrize("make", HANGS.values(), ids=HANGS.keys())
def test_a_hang_stalls_the_session_and_it_resumes_whole(
    sandbox: LoopbackSandbox, link: LinkEmulator, session: EchoSession, make: Callable[..., Fault]
) -> None:
    fault = make(sandbox, link)
    if isinstance(fault, DropPackets) and os.geteuid() != 0:
        pytest.skip("nftables needs root")
    carriers = list(getattr(fault, "pids", []))
    with fault:
        session.send("during")
        assert session.line(STALL_SECONDS) is None, "a line came back through a hung leg"
        assert session.process.poll() is None, "a hang must not end the session"
    assert session.line(BACK_SECONDS) == "during", "the line sent during the hang never came back"
    assert session.echo("after")
    assert not stopped_processes(carriers)
    assert not nft_tables_left()
    assert not link.stats()["blackholed"]


def test_the_hangs_pick_the_right_leg(sandbox: LoopbackSandbox, session: EchoSession) -> None:
    laptop_side = hang_relay_session(sandbox).pids
    relay_sides = {pid for pid, _ in relay_connections(sandbox)}
    vm_side = vm_leg_carriers(sandbox)
    assert set(laptop_side) < relay_sides, "the VM tunnel's relay session was taken for the laptop's"
    assert vm_side and not vm_side & relay_sides


def test_a_fault_ends_by_itself_after_max_seconds(link: LinkEmulator, session: EchoSession) -> None:
    fault = Blackhole(link, max_seconds=0.5).start()
    session.send("held")
    assert session.line(BACK_SECONDS) == "held"
    assert not link.stats()["blackholed"]
    fault.end()


def test_a_laptop_leg_reset_ends_the_session_and_a_new_one_works(
    link: LinkEmulator, laptop: SandboxInfo, session: EchoSession
) -> None:
    accepted = link.stats()["accepted"]
    reset_laptop_leg(link)
    assert session.ended(10), "the session survived a reset of its transport"
    again = EchoSession(laptop)
    try:
        assert again.echo("again")
    finally:
        again.close()
    assert link.stats()["accepted"] == accepted + 1


def outage_test(sandbox: LoopbackSandbox, laptop: SandboxInfo, session: EchoSession, fault: Fault) -> None:
    with fault:
        assert session.ended(10), "the session survived the outage"
        refused = subprocess.run(["ssh", "-F", laptop.ssh_config_file, laptop.vm_alias, "true"],
                                 capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        assert refused.returncode != 0, "the VM was reachable during the outage"
    back = EchoSession(laptop)
    try:
        assert back.echo("back")
    finally:
        back.close()


def test_the_vm_tunnel_killed_and_restarted_comes_back(
    sandbox: LoopbackSandbox, laptop: SandboxInfo, session: EchoSession
) -> None:
    assert sandbox.tunnel is not None
    before = sandbox.tunnel.pid
    outage_test(sandbox, laptop, session, TunnelDown(sandbox))
    assert sandbox.tunnel.alive and sandbox.tunnel.pid != before


def test_a_relay_restart_ends_sessions_and_the_path_comes_back(
    sandbox: LoopbackSandbox, laptop: SandboxInfo, session: EchoSession
) -> None:
    assert sandbox.relay_sshd is not None and sandbox.relay_sshd.pid is not None
    before: list[Any] = [sandbox.relay_sshd.pid, *descendants(sandbox.relay_sshd.pid)]
    outage_test(sandbox, laptop, session, RelayDown(sandbox))
    assert sandbox.relay_sshd.alive and sandbox.relay_sshd.pid not in before


def test_a_vm_leg_hang_longer_than_the_tunnel_keepalive_brings_the_tunnel_back(
    sandbox: LoopbackSandbox, laptop: SandboxInfo
) -> None:
    assert sandbox.tunnel is not None
    before = sandbox.tunnel.pid
    with VmLegHang(sandbox):
        sandbox.tunnel.stop()  # what its keepalive does after 15 s of silence, without the wait
    assert sandbox.tunnel.alive and sandbox.tunnel.pid != before
    back = EchoSession(laptop)
    try:
        assert back.echo("back")
    finally:
        back.close()
    bring_tunnel_back(sandbox.tunnel)  # a running tunnel is left alone
    assert sandbox.tunnel.pid != before
