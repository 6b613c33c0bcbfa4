"""Bad inputs fail fast with a message naming the hop, the cause and the fix, and leave nothing running."""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path

import pytest

from helpers import RELAY_ALIAS, kernel_manager, relay_config, vm_pids, write_ssh_config
from relaykernel.common import errors

pytestmark = pytest.mark.usefixtures("no_ssh_agent")
FAIL_FAST_SECONDS = 15.0


def start_expecting(topology, tmp_path: Path, error_type: type, *fragments: str, **overrides) -> str:
    """Start a kernel that must fail; check the error's type, text, timing and that nothing is left."""
    config = relay_config(topology, tmp_path, **overrides)
    km = kernel_manager(tmp_path, config)
    started = time.monotonic()
    with pytest.raises(error_type) as caught:
        km.start_kernel()
    elapsed = time.monotonic() - started
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert elapsed < FAIL_FAST_SECONDS, f"took {elapsed:.1f} s"
    assert km.kernel_id and not vm_pids(topology, km.kernel_id), "a kernel was left on the VM"
    assert km.provisioner is None or km.provisioner.relayed is None
    return message


def other_config(topology, tmp_path: Path, **fields) -> str:
    return write_ssh_config(topology, tmp_path, **fields)


def test_wrong_relay_port(topology, tmp_path):
    config = other_config(topology, tmp_path, relay_port=1)
    start_expecting(
        topology, tmp_path, errors.ConnectError, "relay", "cannot connect", ssh_config_file=config
    )


def test_wrong_vm_user(topology, tmp_path):
    config = other_config(topology, tmp_path, vm_user="nosuchuser")
    start_expecting(topology, tmp_path, errors.AuthError, "VM", "nosuchuser", ssh_config_file=config)


def test_missing_key(topology, tmp_path):
    config = other_config(topology, tmp_path, identity_file=tmp_path / "no_such_key")
    start_expecting(topology, tmp_path, errors.AuthError, "relay", "IdentityFile", ssh_config_file=config)


def test_vm_not_forwarded_on_the_relay(topology, tmp_path):
    config = other_config(topology, tmp_path, vm_port=1)
    message = start_expecting(topology, tmp_path, errors.ForwardRefused, "relay", "127.0.0.1:1", ssh_config_file=config)
    assert "is the VM's tunnel port" in message and "widen" not in message


def test_unknown_host_key(topology, tmp_path):
    known = tmp_path / "known_hosts"
    relay_line = next(
        line
        for line in Path(topology.known_hosts_file).read_text().splitlines()
        if _port_of(topology.relay) in line
    )
    known.write_text(relay_line + "\n")
    config = other_config(topology, tmp_path, known_hosts=known)
    message = start_expecting(
        topology, tmp_path, errors.UnknownHostKey, "VM", "SHA256:", str(known), ssh_config_file=config
    )
    assert "relaykernel trust testvm --fingerprint SHA256:" in message


def test_changed_host_key(topology, tmp_path):
    known = tmp_path / "known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "other"], check=True)
    other_key = (tmp_path / "other.pub").read_text().split()[:2]
    lines = []
    for line in Path(topology.known_hosts_file).read_text().splitlines():
        if _port_of(topology.vm) in line:
            line = f"{line.split()[0]} {' '.join(other_key)}"
        lines.append(line)
    known.write_text("\n".join(lines) + "\n")
    config = other_config(topology, tmp_path, known_hosts=known)
    message = start_expecting(
        topology, tmp_path, errors.ChangedHostKey, "VM", "SHA256:", ssh_config_file=config
    )
    assert "relaykernel trust testvm --replace --fingerprint SHA256:" in message


def test_no_ipykernel_on_the_vm(topology, tmp_path):
    start_expecting(
        topology,
        tmp_path,
        errors.RemoteLaunchError,
        "ipykernel",
        "pip install ipykernel",
        remote_python=f"{topology.vm_python} -S",
    )


def test_nonexistent_remote_python(topology, tmp_path):
    start_expecting(
        topology,
        tmp_path,
        errors.RemoteLaunchError,
        "/no/such/python",
        "remote_python",
        remote_python="/no/such/python",
    )


def test_unwritable_work_dir(topology, tmp_path):
    start_expecting(
        topology,
        tmp_path,
        errors.RemoteLaunchError,
        "/etc/hostname/work",
        "remote_workdir",
        remote_workdir="/etc/hostname/work",
    )


def test_missing_host_is_a_config_error(tmp_path):
    km = kernel_manager(tmp_path, {"host": ""})
    with pytest.raises(errors.ConfigError, match="no VM host configured"):
        km.start_kernel()


def _port_of(destination: str) -> str:
    return f"]:{destination.rsplit(':', 1)[1]} "


def proxied_config(topology, tmp_path: Path, proxy_command: str) -> str:
    """The usual ssh config with the relay reached through ``proxy_command`` instead of TCP."""
    path = Path(write_ssh_config(topology, tmp_path))
    block = f"Host {RELAY_ALIAS}\n"
    path.write_text(path.read_text().replace(block, f"{block}    ProxyCommand {proxy_command}\n"))
    return str(path)


def running(marker: str) -> list[str]:
    listing = subprocess.run(["pgrep", "-a", "-f", marker], capture_output=True, text=True, timeout=10)
    return listing.stdout.splitlines()


@pytest.mark.parametrize("script", [
    "sleep {marker} & sleep {marker}; echo never",  # hangs, with a child in the background
    "trap '' TERM; sleep {marker} & sleep {marker}",  # and ignores SIGTERM: needs the KILL after the grace
], ids=["hangs-with-children", "ignores-sigterm"])
def test_a_hanging_proxy_command_leaves_no_process_behind(topology, tmp_path, script):
    marker = f"318.{secrets.randbelow(10**6):06d}"
    config = proxied_config(topology, tmp_path, f'sh -c "{script.format(marker=marker)}"')
    message = start_expecting(topology, tmp_path, errors.ConnectError, "relay", "no answer within 2 s",
                              "ProxyCommand `sh -c", "was still running, so it was stopped",
                              ssh_config_file=config, connect_timeout_seconds=2.0)
    assert not running(f"sleep {marker}"), f"left behind after: {message}"


def test_a_failing_proxy_command_shows_its_exit_status_and_stderr(topology, tmp_path):
    script = "echo starting >&2; echo socat: connect to relay.example.org: No route to host >&2; exit 3"
    config = proxied_config(topology, tmp_path, f'sh -c "{script}"')
    start_expecting(topology, tmp_path, errors.ConnectError, "relay",
                    f"ProxyCommand `sh -c \"{script}\"` exited 3: starting / socat: connect to relay.example.org: "
                    "No route to host", ssh_config_file=config)
