"""The test topology is faithful: the VM is reached only through the relay, as its user, and stop() cleans up."""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from relaykernel.common.destination import Destination
from relaykernel.common.errors import ConnectError
from relaykernel.sandbox.sshd import SshdServer
from relaykernel.sandbox.topology import LoopbackSandbox, SandboxInfo
from topology import LeftoverProcessWarning

STRICT = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]


def openssh(info: SandboxInfo, *args: str, timeout_seconds: float = 20) -> subprocess.CompletedProcess[str]:
    argv = ["ssh", "-F", info.ssh_config_file, *STRICT, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_seconds, stdin=subprocess.DEVNULL)


def connect_from_vm(info: SandboxInfo, port: int) -> subprocess.CompletedProcess[str]:
    code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2).close()"
    return info.vm_run([info.vm_python, "-c", code])


def keyscan(port: int) -> str:
    argv = ["ssh-keyscan", "-T", "3", "-t", "ed25519", "-p", str(port), "127.0.0.1"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False).stdout


def vm_host_key(info: SandboxInfo) -> str:
    prefix = f"[127.0.0.1]:{info.forward_port} "
    lines = Path(info.known_hosts_file).read_text().splitlines()
    return next(line[len(prefix) :] for line in lines if line.startswith(prefix))


def pgrep(pattern: str) -> list[str]:
    result = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, timeout=10, check=False)
    return result.stdout.splitlines()


def pids_in_namespace(inode: int) -> list[int]:
    found = []
    for link in Path("/proc").glob("[0-9]*/ns/net"):
        with contextlib.suppress(OSError):
            if os.readlink(link) == f"net:[{inode}]":
                found.append(int(link.parent.parent.name))
    return found


def test_openssh_reaches_the_vm_as_its_user_through_the_relay(topology: SandboxInfo) -> None:
    check_python = shlex.quote("import ipykernel, sys; print(sys.version_info[0])")
    result = openssh(
        topology, topology.vm_alias, f"id -un; echo $SSH_CONNECTION; {topology.vm_python} -c {check_python}"
    )
    assert result.returncode == 0, result.stderr
    user, connection, python_major = result.stdout.splitlines()
    assert user == topology.vm_user
    assert connection.split()[-1] == str(topology.vm_sshd_port), "not served by the VM's sshd"
    assert python_major == "3"


def ssh_to(info: SandboxInfo, destination: str, proxy: list[str] | None = None) -> list[str]:
    """OpenSSH to ``destination`` as written (no ssh config): only the topology's key and known_hosts."""
    hop = Destination.parse(destination)
    argv = ["ssh", "-F", "/dev/null", *STRICT, "-o", "IdentitiesOnly=yes", "-i", info.identity_file]
    argv += ["-o", f"UserKnownHostsFile={info.known_hosts_file}", "-p", str(hop.port), "-l", str(hop.user)]
    if proxy is not None:
        argv += ["-o", f"ProxyCommand={shlex.join([*proxy, '-W', '%h:%p'])}"]
    return [*argv, hop.host]


def test_the_sandbox_destinations_lead_to_each_hop_as_its_user(topology: SandboxInfo) -> None:
    """Follow the destination strings themselves: the relay lets the laptop's key in as the relay user (and runs
    nothing but its forced `true`, whatever is asked), the VM's (jumping through the relay's) answers as the VM user
    from the VM's sshd; neither is taken from the harness's ssh config."""
    relay = ssh_to(topology, topology.relay)
    on_relay = subprocess.run([*relay, "id -un"], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert (on_relay.returncode, on_relay.stdout.strip()) == (0, ""), on_relay.stderr
    vm = ssh_to(topology, topology.vm, proxy=relay)
    on_vm = subprocess.run([*vm, "id -un; echo $SSH_CONNECTION"], capture_output=True, text=True, timeout=20,
                           stdin=subprocess.DEVNULL)
    assert on_vm.returncode == 0, on_vm.stderr
    user, connection = on_vm.stdout.splitlines()
    assert user == topology.vm_user
    assert connection.split()[-1] == str(topology.vm_sshd_port), "not served by the VM's sshd"
    assert topology.vm_run(["id", "-un"]).stdout.strip() == topology.vm_user


def test_vm_run_pgrep_sees_no_wrapper_of_its_own(topology: SandboxInfo) -> None:
    pattern = f"no-such-process-{secrets.token_hex(4)}"
    assert topology.vm_run(["pgrep", "-f", pattern]).returncode == 1


def test_the_relay_lets_the_laptop_key_open_only_the_forward(topology: SandboxInfo) -> None:
    result = openssh(topology, "-W", f"127.0.0.1:{topology.relay_port}", topology.relay_alias)
    assert result.returncode != 0
    assert "administratively prohibited" in result.stderr


def test_the_vm_cannot_reach_the_relay_port_directly(topology: SandboxInfo) -> None:
    if topology.netns is None:
        pytest.skip("the loopback sandbox shares one network")
    assert connect_from_vm(topology, topology.vm_sshd_port).returncode == 0, "the probe itself is broken"
    refused = connect_from_vm(topology, topology.relay_port)
    assert refused.returncode != 0
    assert "ConnectionRefusedError" in refused.stderr


def test_the_vm_sshd_is_reachable_from_here_only_through_the_forward(topology: SandboxInfo) -> None:
    if topology.netns is None:
        pytest.skip("the loopback sandbox shares one network")
    key = vm_host_key(topology)
    assert key in keyscan(topology.forward_port)
    assert key not in keyscan(topology.vm_sshd_port)


def test_stop_leaves_no_process_namespace_or_file(topology_class: type[LoopbackSandbox]) -> None:
    sandbox = topology_class()
    started = time.monotonic()
    info = sandbox.start()
    assert time.monotonic() - started < 5, "the topology should start in well under 2 s"
    marker = f"sleep 7{secrets.randbelow(10**6)}.5"
    session = subprocess.Popen(
        ["ssh", "-F", info.ssh_config_file, *STRICT, info.vm_alias, f"echo ready; exec {marker}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert session.stdout and select.select([session.stdout], [], [], 10)[0], "the session never started"
        assert session.stdout.readline() == b"ready\n"
        namespace = os.stat(f"/run/netns/{info.netns}").st_ino if info.netns else None
        warns = pytest.warns(LeftoverProcessWarning, match="sleep") if info.netns else contextlib.nullcontext()
        with warns:
            sandbox.stop()
        sandbox.stop()
        session.wait(timeout=10)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
        if session.stdout:
            session.stdout.close()
    assert not pgrep(marker), "the VM session's command survived stop()"
    assert not pgrep(info.state_dir), "a sandbox process survived stop()"
    assert not Path(info.state_dir).exists()
    if namespace is not None:
        assert (
            info.netns
            and info.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        )
        assert not pids_in_namespace(namespace)


def test_sshd_that_cannot_start_says_why(tmp_path: Path) -> None:
    server = SshdServer(state_dir=tmp_path, authorized_keys={}, extra_config=["NoSuchOption yes"], hop="relay")
    with pytest.raises(ConnectError, match="(?s)relay 127.0.0.1:.*exited.*NoSuchOption"):
        server.start()
    assert not server.alive
