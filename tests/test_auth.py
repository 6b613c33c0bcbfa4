"""Logging in with ssh-agent keys leaves no agent connection open once the hop is authenticated."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import VM_ALIAS, wait_until, write_ssh_config
from relaykernel.options import RelayOptions
from relaykernel.relayed import build_chain


@pytest.fixture
def agent(topology, tmp_path, monkeypatch) -> Iterator[subprocess.Popen[bytes]]:
    """A private ssh-agent holding the topology's key, as SSH_AUTH_SOCK."""
    socket_path = tmp_path / "agent.sock"
    process = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        assert wait_until(socket_path.exists, 5), "ssh-agent did not start"
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        subprocess.run(["ssh-add", "-q", topology.identity_file], check=True, capture_output=True, timeout=10)
        yield process
    finally:
        process.terminate()
        process.wait(10)


def agent_clients(agent: subprocess.Popen[bytes]) -> int:
    """Sockets the agent holds open besides its listening one: one per connected client."""
    links = []
    for fd in Path(f"/proc/{agent.pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            links.append(os.readlink(fd))
    return sum(1 for link in links if link.startswith("socket:")) - 1


def test_agent_connections_close_after_each_hop_logs_in(topology, tmp_path, agent):
    config = write_ssh_config(topology, tmp_path, identity_file=tmp_path / "not_there", identities_only="no")
    chain = build_chain(RelayOptions(host=VM_ALIAS, ssh_config_file=config, connect_timeout_seconds=10.0))
    try:
        for _ in range(3):  # a reconnect authenticates again: nothing may pile up
            chain.connect()
            assert chain.is_active()
            assert wait_until(lambda: agent_clients(agent) == 0, 5), f"{agent_clients(agent)} agent links left open"
            chain.drop(keep_relays=False)
    finally:
        chain.close()
