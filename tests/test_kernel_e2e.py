"""A real kernel on the VM through the relay, driven by jupyter_client's KernelManager."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import (
    RELAY_ALIAS,
    VM_ALIAS,
    execute,
    kernel_manager,
    port_accepts,
    relay_config,
    vm_pids,
    wait_until,
    write_ssh_config,
)
from relaykernel.common.protocol import PORT_NAMES as KERNEL_PORT_NAMES

pytestmark = pytest.mark.usefixtures("no_ssh_agent")


@pytest.fixture
def running(topology, tmp_path):
    """A started relay kernel and its client; shut down (and checked for leftovers) after the test."""
    config = relay_config(topology, tmp_path)
    km = kernel_manager(tmp_path, config)
    km.start_kernel()
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=30)
    yield km, client, config
    client.stop_channels()
    if km.has_kernel:
        km.shutdown_kernel(now=False)


def test_code_runs_on_the_vm_as_its_user_in_the_work_dir(topology, running):
    km, client, config = running
    out, reply = execute(client, "import getpass, os; print(getpass.getuser()); print(os.getcwd())")
    assert reply["status"] == "ok"
    user, cwd = out.split()
    assert user == topology.vm_user
    assert cwd.endswith(config["remote_workdir"].lstrip("~/"))
    if topology.netns:
        out, _ = execute(client, "import os; print(os.readlink('/proc/self/ns/net'))")
        assert out.strip() != os.readlink("/proc/self/ns/net"), (
            "the kernel must run inside the VM's namespace"
        )


def test_the_client_talks_to_local_forwards_only(running):
    km, _, _ = running
    info = km.get_connection_info()
    assert info["ip"] == "127.0.0.1"
    assert all(port_accepts(info[name]) for name in KERNEL_PORT_NAMES)


def test_interrupt_stops_a_sleep_within_two_seconds(running):
    km, client, _ = running
    msg_id = client.execute("import time; time.sleep(60)")
    time.sleep(1.0)
    started = time.monotonic()
    km.interrupt_kernel()
    reply = client.get_shell_msg(timeout=10)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - started < 2.0


def test_restart_gives_a_fresh_kernel_on_the_same_local_ports(topology, running):
    km, client, _ = running
    execute(client, "answer = 42")
    before = km.get_connection_info()
    old_kernel = km.provisioner.relayed.info()["remote_pid"]
    km.restart_kernel(now=False)
    client.wait_for_ready(timeout=30)
    out, reply = execute(client, "print('answer' in globals())")
    assert out.strip() == "False"
    assert km.get_connection_info()["shell_port"] == before["shell_port"]
    assert wait_until(lambda: str(old_kernel) not in map(str, vm_pids(topology, "ipykernel")), 10)


def test_shutdown_leaves_nothing_on_the_vm_or_here(topology, tmp_path):
    km = kernel_manager(tmp_path, relay_config(topology, tmp_path))
    km.start_kernel()
    kernel_id = km.provisioner.kernel_id
    info = km.get_connection_info()
    assert vm_pids(topology, kernel_id)
    km.shutdown_kernel()
    assert wait_until(lambda: not vm_pids(topology, kernel_id), 10), "kernel left on the VM"
    assert not any(port_accepts(info[name]) for name in KERNEL_PORT_NAMES), "local listener left"
    assert topology.vm_run(["sh", "-c", f"ls ~/.relaykernel/run/{kernel_id}"]).returncode != 0


_LOCAL_SIDE = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    from helpers import kernel_manager
    from pathlib import Path
    km = kernel_manager(Path(sys.argv[2]), json.loads(sys.argv[3]))
    km.start_kernel()
    print(km.provisioner.kernel_id, flush=True)
    time.sleep(600)
    """
)


def test_a_killed_laptop_leaves_the_kernel_to_its_lease(topology, tmp_path):
    import json

    config = relay_config(topology, tmp_path, lease_seconds=3.0, liveness_interval_seconds=1.0)
    tests_dir = os.path.dirname(__file__)
    local = subprocess.Popen(
        [sys.executable, "-c", _LOCAL_SIDE, tests_dir, str(tmp_path), json.dumps(config)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        kernel_id = local.stdout.readline().strip()
        assert kernel_id and vm_pids(topology, kernel_id)
        time.sleep(4)  # longer than the lease: renewals keep it alive
        assert vm_pids(topology, kernel_id)
        local.send_signal(signal.SIGKILL)
        local.wait()
        assert wait_until(lambda: not vm_pids(topology, kernel_id), 3 + 6), "kernel outlived its lease"
    finally:
        local.kill()
        local.wait()
        local.stdout.close()


def _proxy_command_route(topology, tmp_path):
    config = write_ssh_config(topology, tmp_path)
    text = Path(config).read_text().replace(
        f"ProxyJump {RELAY_ALIAS}", f"ProxyCommand ssh -F {config} -W %h:%p {RELAY_ALIAS}"
    )
    Path(config).write_text(text)
    return {"host": VM_ALIAS, "ssh_config_file": config}


def _explicit_jump_route(topology, tmp_path):
    config = write_ssh_config(topology, tmp_path)
    return {"host": topology.vm, "jump": topology.relay, "ssh_config_file": config}


@pytest.mark.parametrize("route", [_proxy_command_route, _explicit_jump_route], ids=["ProxyCommand", "jump"])
def test_other_routes_to_the_vm(topology, tmp_path, route):
    km = kernel_manager(tmp_path, relay_config(topology, tmp_path, **route(topology, tmp_path)))
    km.start_kernel()
    try:
        client = km.client()
        client.start_channels()
        client.wait_for_ready(timeout=30)
        out, _ = execute(client, "import getpass; print(getpass.getuser())")
        assert out.strip() == topology.vm_user
        client.stop_channels()
    finally:
        km.shutdown_kernel()


@pytest.fixture
def ssh_agent_with_the_key(topology, tmp_path, monkeypatch):
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        wait_until(socket_path.exists, 5)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        subprocess.run(["ssh-add", "-q", topology.identity_file], check=True, capture_output=True)
        yield
    finally:
        agent.terminate()
        agent.wait()


def test_ssh_agent_keys_log_in(topology, tmp_path, ssh_agent_with_the_key):
    config = write_ssh_config(topology, tmp_path, identity_file=tmp_path / "not_there", identities_only="no")
    km = kernel_manager(tmp_path, relay_config(topology, tmp_path, ssh_config_file=config))
    km.start_kernel()
    km.shutdown_kernel()


def test_a_cell_of_another_protocol_is_named_with_both_versions_and_the_fix(topology, tmp_path, caplog):
    """The VM's cell was set up by another relaykernel: the start says which side to update, in one line."""
    cell_json = '{"relaykernel": "0.0.9", "protocol": 1}'
    saved = topology.vm_run(["cat", ".relaykernel/cell.json"])  # the VM user's real one, if a cell test wrote it
    topology.vm_run(["sh", "-c", f"mkdir -p ~/.relaykernel && printf '%s' '{cell_json}' > ~/.relaykernel/cell.json"])
    try:
        km = kernel_manager(tmp_path, relay_config(topology, tmp_path))
        km.start_kernel()
        km.shutdown_kernel(now=True)
    finally:
        restore = f"printf '%s' {shlex.quote(saved.stdout)} > ~/.relaykernel/cell.json" if saved.returncode == 0 else \
            "rm -f ~/.relaykernel/cell.json"
        topology.vm_run(["sh", "-c", restore])
    lines = [r.getMessage() for r in caplog.records if "the VM's cell is relaykernel 0.0.9" in r.getMessage()]
    assert len(lines) == 1 and "the laptop runs relaykernel" in lines[0] and "rerun the cell" in lines[0], lines
