"""The topology the benchmarks run on (netns as root, else loopback), and the emulated links they measure across."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from relaykernel.sandbox.topology import LoopbackSandbox, SandboxInfo

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS_DIR))  # the test kit: topology.py (netns) and linkemu.py (the emulated link)

from linkemu import LinkEmulator, through_link  # noqa: E402


@dataclass(frozen=True)
class Profile:
    """A laptop↔relay link: round trip, and rates each way (None: as fast as loopback); ``direct``: no emulator."""

    name: str
    rtt_ms: float
    up_mbit: float | None = None
    down_mbit: float | None = None
    direct: bool = False

    def describe(self) -> str:
        if self.direct:
            return "direct (no emulator: loopback)"
        rates = [f"{value:g} Mbit/s {way}" for way, value in (("up", self.up_mbit), ("down", self.down_mbit)) if value]
        return ", ".join([f"RTT {self.rtt_ms:g} ms", *rates] if rates else [f"RTT {self.rtt_ms:g} ms, no rate limit"])


PROFILES = {
    profile.name: profile
    for profile in (
        Profile("direct", 0, direct=True),
        Profile("0", 0),
        Profile("50", 50),
        Profile("150", 150),
        Profile("50-20mbit", 50, 20, 20),
        Profile("50-1mbit-up", 50, 1, 20),
    )
}
DEFAULT_PROFILES = "0,50,150,50-20mbit,50-1mbit-up"


def parse_profiles(text: str) -> list[Profile]:
    """``0,50,150`` → those profiles, in that order; an unknown name is a usage error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PROFILES]
    if unknown or not names:
        known = ", ".join(PROFILES)
        raise argparse.ArgumentTypeError(f"unknown profile {', '.join(unknown) or text!r}: choose from {known}")
    return [PROFILES[name] for name in names]


def across_link(stack: contextlib.ExitStack, sandbox: LoopbackSandbox, profile: Profile, scratch: Path,
                ) -> tuple[SandboxInfo, LinkEmulator | None]:
    """The sandbox as a laptop sees it across ``profile``'s link (the emulator runs until ``stack`` closes)."""
    if profile.direct:
        return sandbox.info, None
    assert sandbox.relay_sshd is not None
    emulator = LinkEmulator(sandbox.relay_sshd.port, delay_ms=profile.rtt_ms / 2, up_mbit=profile.up_mbit,
                            down_mbit=profile.down_mbit)
    stack.enter_context(emulator)
    return through_link(sandbox.info, emulator, scratch / f"link-{profile.name}"), emulator


def open_sandbox(stack: contextlib.ExitStack) -> tuple[LoopbackSandbox, str]:
    """NetnsTopology as root (the VM reachable only through the relay), else the loopback sandbox; and its name."""
    if os.geteuid() == 0:
        from topology import NetnsTopology

        sandbox: LoopbackSandbox = NetnsTopology()
        kind = "netns (VM in its own network namespace, reached only through the relay)"
    else:
        sandbox, kind = LoopbackSandbox(), "loopback (relay and VM sshd on 127.0.0.1, not root)"
    stack.callback(sandbox.stop)
    sandbox.start()
    return sandbox, kind


def open_topology(stack: contextlib.ExitStack) -> tuple[SandboxInfo, str]:
    """The running topology's SandboxInfo and its name (see ``open_sandbox``)."""
    sandbox, kind = open_sandbox(stack)
    return sandbox.info, kind
