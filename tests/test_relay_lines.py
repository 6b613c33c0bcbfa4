"""The documented relay lines, installed on the test relay's sshd, allow each key exactly its forward and `true`.

Every check runs a real OpenSSH client against the topology's relay sshd, which the sandbox sets up with
``relaykernel.common.relay_keys`` (the lines the cell prints and docs/relay.md gives).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import paramiko
import pytest

from helpers import VM_ALIAS, wait_until, write_ssh_config
from relaykernel.common.relay_keys import laptop_key_line, relay_sshd_config, tunnel_key_line
from relaykernel.doctor import Check, run_checks
from relaykernel.options import RelayOptions
from relaykernel.sandbox.keys import generate_keypairs
from relaykernel.sandbox.ports import LOOPBACK, free_loopback_ports
from relaykernel.sandbox.processes import stop_process_tree
from relaykernel.sandbox.sshd import SshdServer
from relaykernel.sandbox.tools import find_tool
from relaykernel.ssh.chain import _exec_true

DOCS = Path(__file__).resolve().parent.parent / "docs"
SSH_TIMEOUT_SECONDS = 20.0
KEYS = ["laptop", "vm-tunnel"]


def key_file(topology, which: str) -> str:
    return topology.identity_file if which == "laptop" else str(Path(topology.state_dir) / "vm/tunnel_key")


def relay_ssh(topology, key: str, options: Sequence[str] = (),
              command: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """One real ssh to the topology's relay with only ``key``; ExitOnForwardFailure so a refused -R is an exit."""
    argv = [find_tool("ssh"), "-F", "none", "-i", key, "-p", str(topology.relay_port),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={topology.known_hosts_file}", "-o", "ExitOnForwardFailure=yes",
            *options, f"{topology.relay_user}@{LOOPBACK}", *command]
    env = {key: value for key, value in os.environ.items() if key != "SSH_AUTH_SOCK"}
    return subprocess.run(argv, input="", capture_output=True, text=True, timeout=SSH_TIMEOUT_SECONDS,
                          check=False, env=env)


def relay_log(topology) -> str:
    return (Path(topology.state_dir) / "relay/sshd/sshd.log").read_text(errors="replace")


@pytest.mark.parametrize("which", KEYS)
def test_true_runs_and_any_other_command_runs_true_instead(topology, which):
    assert relay_ssh(topology, key_file(topology, which), command=["true"]).returncode == 0
    marker = f"rk-ran-{secrets.token_hex(4)}"
    home = Path(pwd.getpwnam(topology.relay_user).pw_dir)
    result = relay_ssh(topology, key_file(topology, which), command=[f"echo {marker}; id; touch ~/{marker}"])
    assert result.returncode == 0 and result.stdout == "", result
    assert not (home / marker).exists(), "a command other than true ran on the relay"
    assert "Starting session: forced-command (key-option) 'true'" in relay_log(topology)


@pytest.mark.parametrize("which", KEYS)
def test_no_shell_no_pty_no_sftp(topology, which):
    sftp = subprocess.run(
        [find_tool("sftp"), "-b", "-", "-F", "none", "-i", key_file(topology, which), "-P", str(topology.relay_port),
         "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={topology.known_hosts_file}",
         f"{topology.relay_user}@{LOOPBACK}"], input="pwd\n", capture_output=True, text=True,
        timeout=SSH_TIMEOUT_SECONDS, check=False)
    assert sftp.returncode != 0 and "Remote working directory" not in sftp.stdout, sftp  # sftp-server never ran
    pty = relay_ssh(topology, key_file(topology, which), options=["-tt"], command=["true"])
    assert "PTY allocation request failed" in pty.stderr, pty


def test_laptop_key_opens_the_vm_port(topology):
    result = relay_ssh(topology, topology.identity_file, options=["-W", f"{LOOPBACK}:{topology.forward_port}"])
    assert result.stdout.startswith("SSH-2.0-"), result  # the VM's sshd, through the VM's tunnel


@pytest.mark.parametrize("which", KEYS)
def test_opening_another_port_is_refused(topology, which):
    result = relay_ssh(topology, key_file(topology, which), options=["-W", f"{LOOPBACK}:{topology.relay_port}"])
    assert result.returncode == 255 and "administratively prohibited" in result.stderr, result
    assert "SSH-2.0" not in result.stdout


def test_tunnel_key_opens_nothing_not_even_its_own_port(topology):
    result = relay_ssh(topology, key_file(topology, "vm-tunnel"),
                       options=["-W", f"{LOOPBACK}:{topology.forward_port}"])
    assert result.returncode == 255 and "administratively prohibited" in result.stderr, result


@pytest.mark.parametrize("which", KEYS)
def test_listening_on_another_port_is_refused(topology, which):
    (spare,) = free_loopback_ports(1)
    result = relay_ssh(topology, key_file(topology, which), options=["-R", f"{LOOPBACK}:{spare}:{LOOPBACK}:9"],
                       command=["true"])
    assert result.returncode == 255 and f"remote port forwarding failed for listen port {spare}" in result.stderr
    assert not _accepts(spare)


@pytest.mark.parametrize("which", KEYS)
def test_unix_socket_forwarding_is_refused(topology, which):
    """Unix-socket forwards ignore permitopen/permitlisten: the relay's AllowStreamLocalForwarding no stops them."""
    path = Path(pwd.getpwnam(topology.relay_user).pw_dir) / f"rk-{secrets.token_hex(4)}.sock"  # its own home
    result = relay_ssh(topology, key_file(topology, which), options=["-R", f"{path}:{LOOPBACK}:9"],
                       command=["true"])
    assert result.returncode == 255 and "remote port forwarding failed" in result.stderr, result
    assert not path.exists()
    (local,) = free_loopback_ports(1)
    with _unix_listener(path) as target, \
            _background_ssh(topology, key_file(topology, which), ["-N", "-L", f"{LOOPBACK}:{local}:{path}"]):
        assert wait_until(lambda: _accepts(local), 10), "ssh did not open its local listener"
        with socket.create_connection((LOOPBACK, local), timeout=5) as conn:
            conn.settimeout(5)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                conn.recv(64)  # EOF at once when the relay refuses the channel
        with pytest.raises(BlockingIOError):
            target.accept()  # nothing reached the socket on the relay


@contextlib.contextmanager
def relay_lines(topology, *lines: str) -> Iterator[None]:
    """The relay's authorized_keys holds ``lines`` (and the VM's tunnel line) for a while, then what it held."""
    keys_file = Path(topology.state_dir) / "relay/sshd/authorized_keys" / topology.relay_user
    saved = keys_file.read_bytes()
    vm1_line = next(line for line in saved.decode().splitlines() if "permitlisten=\"127.0.0.1:" in line)
    keys_file.write_text("\n".join([*lines, vm1_line, ""]))
    try:
        yield
    finally:
        keys_file.write_bytes(saved)


def laptop_public_key(topology) -> str:
    return " ".join(Path(topology.identity_file + ".pub").read_text().split()[:2])


def test_a_second_vm_gets_its_own_port_and_the_laptop_cannot_take_it(topology, tmp_path):
    """The several-VMs lines: VM 2's key listens on its port only; while it is away, the laptop cannot listen there."""
    (vm2_key,) = generate_keypairs([tmp_path / "vm2_tunnel_key"])
    vm2_port, other_port = free_loopback_ports(2)
    laptop_line = laptop_key_line(laptop_public_key(topology), [topology.forward_port, vm2_port], "laptop")
    with relay_lines(topology, laptop_line, tunnel_key_line(vm2_key.public_key, vm2_port, "vm2-tunnel")):
        target = f"{LOOPBACK}:{topology.relay_port}"  # the relay's sshd stands in for VM 2's
        with _background_ssh(topology, str(vm2_key.private_file), ["-N", "-R", f"{LOOPBACK}:{vm2_port}:{target}"]):
            assert wait_until(lambda: _accepts(vm2_port), 10), "VM 2's tunnel did not come up"
            through = relay_ssh(topology, topology.identity_file, options=["-W", f"{LOOPBACK}:{vm2_port}"])
            assert through.stdout.startswith("SSH-2.0-"), through
            refused = relay_ssh(topology, str(vm2_key.private_file),
                                options=["-R", f"{LOOPBACK}:{other_port}:{target}"], command=["true"])
            assert refused.returncode == 255 and "remote port forwarding failed" in refused.stderr, refused
        assert wait_until(lambda: not _accepts(vm2_port), 10)
        hijack = relay_ssh(topology, topology.identity_file, options=["-R", f"{LOOPBACK}:{vm2_port}:{target}"],
                           command=["true"])
        assert hijack.returncode == 255 and "remote port forwarding failed" in hijack.stderr, hijack
        assert relay_ssh(topology, topology.identity_file, command=["true"]).returncode == 0


def doctor_lines(topology, tmp_path) -> dict[str, Check]:
    config = write_ssh_config(topology, tmp_path)
    options = RelayOptions(host=VM_ALIAS, ssh_config_file=config, remote_python=topology.vm_python)
    return {check.name: check for check in run_checks(options)}


def test_doctor_says_the_laptop_key_cannot_listen(topology, tmp_path):
    check = doctor_lines(topology, tmp_path)["relay key cannot listen"]
    assert check.ok and not check.warn, check


def test_doctor_warns_when_the_laptop_key_may_listen(topology, tmp_path):
    port = topology.forward_port
    old_style = f'restrict,port-forwarding,permitopen="{LOOPBACK}:{port}" {laptop_public_key(topology)}'
    with relay_lines(topology, old_style):
        checks = doctor_lines(topology, tmp_path)
    check = checks["relay key cannot listen"]
    assert check.ok and check.warn and "MAY LISTEN" in check.detail and "permitlisten" in check.fix, check
    assert all(other.ok for other in checks.values()), "a warning stops nothing: the VM checks ran too"
    assert "remote python + ipykernel" in checks


def test_the_laptops_true_still_switches_on_nodelay(tmp_path):
    """Under the forced command the laptop's one exec still runs, and sshd still sets TCP_NODELAY for it."""
    (key,) = generate_keypairs([tmp_path / "laptop_key"])
    user = pwd.getpwuid(os.geteuid()).pw_name
    sshd = SshdServer(state_dir=tmp_path / "relay", authorized_keys={user: [laptop_key_line(key.public_key, [7423])]},
                      extra_config=["LogLevel DEBUG2", *relay_sshd_config()], hop="relay")
    with sshd, socket.create_connection((LOOPBACK, sshd.port), timeout=10) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=10)
            transport.auth_publickey(user, paramiko.PKey.from_path(str(key.private_file)))
            _exec_true(transport, 10.0)
        finally:
            transport.close()
        log = sshd.log_file
        assert wait_until(lambda: "setting TCP_NODELAY" in log.read_text(), 5), sshd.log_tail(40)
        assert "forced-command (key-option) 'true'" in log.read_text()


def test_the_docs_give_the_lines_the_code_builds():
    relay_md = (DOCS / "relay.md").read_text()
    example = "ssh-ed25519 AAAA…"
    assert tunnel_key_line(example, 7423, "relaykernel-vm-tunnel-colab") in relay_md
    assert laptop_key_line(example, [7423], "laptop") in relay_md
    assert laptop_key_line(example, [7423, 7424], "laptop") in relay_md
    for setting in relay_sshd_config():
        assert any(line.split() == setting.split() for line in _config_lines(relay_md)), setting
    assert tunnel_key_line(example, 7423, "relaykernel-vm-tunnel-colab") in (DOCS / "getting-started.md").read_text()


def _config_lines(markdown: str) -> Iterator[str]:
    for line in markdown.splitlines():
        yield line.split("#", 1)[0].strip()


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
        return True
    return False


@contextlib.contextmanager
def _unix_listener(path: Path) -> Iterator[socket.socket]:
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        path.chmod(0o666)
        server.listen(1)
        server.setblocking(False)
        yield server
    finally:
        server.close()
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _background_ssh(topology, key: str, options: Sequence[str]) -> Iterator[subprocess.Popen[bytes]]:
    argv = [find_tool("ssh"), "-F", "none", "-i", key, "-p", str(topology.relay_port),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
            "-o", f"UserKnownHostsFile={topology.known_hosts_file}", *options, f"{topology.relay_user}@{LOOPBACK}"]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield process
    finally:
        stop_process_tree(process)
