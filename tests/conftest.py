"""Shared fixtures: a real relay + VM topology (netns as root, loopback otherwise) and a thread-leak guard."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from relaykernel.common.errors import HopError
from relaykernel.sandbox.tools import find_tool
from relaykernel.sandbox.topology import LoopbackSandbox, SandboxInfo
from topology import NetnsTopology

TOPOLOGY_ENV = "RELAYKERNEL_TEST_TOPOLOGY"  # "netns" or "loopback" forces one (and fails if unavailable)
THREAD_GRACE_SECONDS = 2.0


def _openssh_missing() -> str | None:
    """Why the loopback sandbox cannot run here, or None."""
    try:
        for tool in ("sshd", "ssh", "ssh-keygen"):
            find_tool(tool)
    except HopError as error:
        return str(error)
    return None


def _netns_missing() -> str | None:
    """Why the netns topology cannot run here, or None."""
    if os.geteuid() != 0:
        return "the netns topology needs root"
    for tool in ("ip", "unshare", "runuser", "useradd", "usermod", "socat"):
        if shutil.which(tool) is None:
            return f"the netns topology needs {tool} (apt-get install iproute2 util-linux passwd socat)"
    for probe in (["ip", "netns", "list"], ["unshare", "--net", "true"]):
        if subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode != 0:
            return f"network namespaces do not work here ({' '.join(probe)} failed)"
    return _openssh_missing()


def _choose_topology() -> tuple[type[LoopbackSandbox] | None, str]:
    """The topology class to use and, when there is none, why."""
    forced = os.environ.get(TOPOLOGY_ENV, "").strip().lower()
    if forced not in ("", "netns", "loopback"):
        return None, f"{TOPOLOGY_ENV}={forced!r}: use 'netns' or 'loopback'"
    if forced != "loopback":
        why_not = _netns_missing()
        if why_not is None:
            return NetnsTopology, ""
        if forced == "netns":
            return None, why_not
    why_not = _openssh_missing()
    return (LoopbackSandbox, "") if why_not is None else (None, why_not)


@pytest.fixture(scope="session")
def topology_class() -> type[LoopbackSandbox]:
    """NetnsTopology as root where namespaces work, else LoopbackSandbox; skip (or fail when forced) if neither."""
    chosen, reason = _choose_topology()
    if chosen is None:
        if os.environ.get(TOPOLOGY_ENV):
            pytest.fail(f"{TOPOLOGY_ENV} asks for a topology this machine cannot run: {reason}", pytrace=False)
        pytest.skip(f"no SSH test topology: {reason}")
    return chosen


@pytest.fixture(scope="session")
def topology(topology_class: type[LoopbackSandbox]) -> Iterator[SandboxInfo]:
    """One running relay + VM for the whole session, as a SandboxInfo (relay, vm, ssh config, vm_run...)."""
    with topology_class() as info:
        yield info


def _is_pool_worker(thread: threading.Thread) -> bool:
    """A worker of a long-lived event loop's default executor (jupyter_client keeps one): reused, not leaked."""
    return thread.name.startswith("asyncio_")


@pytest.fixture
def no_ssh_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Log in with the topology's key alone: a developer's ssh-agent would offer its own keys first."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """Fail a test that leaves threads running past a short grace; threads that predate it are ignored."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_SECONDS
    leaked = [thread for thread in threading.enumerate() if thread not in before and not _is_pool_worker(thread)]
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = [thread for thread in leaked if thread.is_alive()]
    if leaked:
        pytest.fail(f"test leaked threads: {', '.join(thread.name for thread in leaked)}", pytrace=False)
