"""Link faults: a cut kills nothing and the same kernel comes back; a kernel that dies on the VM is reported."""

from __future__ import annotations

import time

import pytest

from helpers import execute, relay_config, running_kernel, wait_until

pytestmark = pytest.mark.usefixtures("no_ssh_agent")


@pytest.fixture
def own_topology(topology_class):
    """A topology of this test's own, since the test cuts its tunnel."""
    sandbox = topology_class()
    sandbox.start()
    yield sandbox
    sandbox.stop()


@pytest.fixture
def fast_kernel(own_topology, tmp_path):
    config = relay_config(
        own_topology.info, tmp_path, liveness_interval_seconds=0.5, command_timeout_seconds=3.0,
        reconnect_max_backoff_seconds=1.0, lease_seconds=60.0,
    )
    with running_kernel(tmp_path, config) as started:
        yield started


def test_a_tunnel_cut_kills_nothing_and_the_same_kernel_answers_after(own_topology, fast_kernel):
    km, client = fast_kernel
    execute(client, "x = 41")
    relayed = km.provisioner.relayed
    pid_before, accepted_before = relayed.info()["remote_pid"], dict(relayed.link.accepted)
    own_topology.tunnel.stop()
    assert wait_until(lambda: relayed.keeper.is_down, 10), "the cut went unnoticed"
    time.sleep(2.0)
    assert km.is_alive(), "poll() must not report a death while only the link is down"
    own_topology.tunnel.start()
    assert wait_until(lambda: not relayed.keeper.is_down, 20), "no reconnect after the tunnel came back"
    # The streams resume under the client's sockets: the very next cell works, output and all, no warm-up.
    out, reply = execute(client, "x += 1; print(x)", timeout_seconds=30)
    assert (out.strip(), reply["status"]) == ("42", "ok")
    assert relayed.info()["remote_pid"] == pid_before
    # The heartbeat client makes a new REQ socket whenever a beat is late (as with a busy local kernel);
    # every other socket must never have seen a disconnect.
    accepted = {name: count for name, count in relayed.link.accepted.items() if name != "hb_port"}
    assert accepted == {name: accepted_before[name] for name in accepted}, "a client socket saw a disconnect"


def test_a_kernel_killed_on_the_vm_is_reported_dead(own_topology, fast_kernel):
    km, _ = fast_kernel
    pid = km.provisioner.relayed.info()["remote_pid"]
    own_topology.info.vm_run(["kill", "-KILL", str(pid)])
    assert wait_until(lambda: not km.is_alive(), 10), "a dead kernel must be reported by poll()"


def test_a_link_cut_mid_sync_ends_consistent_once_the_link_is_back(own_topology, tmp_path, caplog):
    import hashlib
    import os

    from relaykernel.options import RelayOptions
    from relaykernel.relayed import build_chain
    from relaykernel.sync.engine import WorkdirSync
    from relaykernel.sync.ignore import IgnoreRules
    from relaykernel.sync.remote import RemoteTree

    info = own_topology.info
    options = RelayOptions(**relay_config(info, tmp_path, connect_timeout_seconds=2.0, command_timeout_seconds=3.0))
    chain = build_chain(options)
    chain.connect()
    local = tmp_path / "project"
    local.mkdir()
    remote = RemoteTree(chain, python_argv=options.python_argv(), root="~/rk-cut-sync", timeout_seconds=3.0)
    real_apply, cut_at = remote.apply, []

    def apply_cut_midway(local_root, batch, on_bytes=None):
        """Cut the tunnel from inside the upload, once 2 MB of a batch of 20 MB have gone: a batch is surely cut."""
        sent = [0]

        def counted(count: int) -> None:
            sent[0] += count
            if on_bytes:
                on_bytes(count)
            if not cut_at and sent[0] > 2_000_000:
                cut_at.append(sent[0])
                own_topology.tunnel.stop()

        return real_apply(local_root, batch, counted)

    remote.apply = apply_cut_midway  # type: ignore[method-assign]
    sync = WorkdirSync(local, remote, IgnoreRules(local), rescan_seconds=1.0).watch()
    try:
        (local / "big.bin").write_bytes(os.urandom(20 << 20))
        for i in range(100):
            (local / f"small{i}.txt").write_text(f"{i}\n" * 100)
        assert wait_until(lambda: cut_at, 30), "the upload never started"
        (local / "during-the-cut.txt").write_text("written while the VM was away")
        assert wait_until(lambda: "was cut" in caplog.text, 30), "the cut batch must fail, not pass silently"
        own_topology.tunnel.start()

        def consistent() -> bool:
            listing = info.vm_run(["sh", "-c", "cd rk-cut-sync 2>/dev/null && sha256sum *"]).stdout.split("\n")
            there = {line.split()[1]: line.split()[0] for line in listing if line.strip()}
            here = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in local.iterdir()}
            return there == here

        assert wait_until(consistent, 30), "the VM's copy did not catch up after the cut"
        leftovers = info.vm_run(["sh", "-c", "ls -a rk-cut-sync | grep -c rk-tmp || true"]).stdout.strip()
        assert leftovers == "0", "a cut transfer must not leave temporary files behind"
    finally:
        sync.stop()
        info.vm_run(["rm", "-rf", "rk-cut-sync"])
        chain.close()
