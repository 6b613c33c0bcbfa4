"""Small helpers shared by the end-to-end tests: ssh config variants, kernelspecs, VM process checks."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

from relaykernel.common.destination import Destination
from relaykernel.kernelspec import build_kernel_json

VM_ALIAS = "testvm"
RELAY_ALIAS = "testrelay"


def write_ssh_config(topology: Any, directory: Path, **overrides: Any) -> str:
    """An ssh config with the aliases 'testrelay' and 'testvm'; keyword overrides change single fields."""
    relay, vm = Destination.parse(topology.relay), Destination.parse(topology.vm)
    fields = {
        "relay_port": relay.port,
        "relay_user": relay.user,
        "vm_port": vm.port,
        "vm_user": vm.user,
        "identity_file": topology.identity_file,
        "known_hosts": topology.known_hosts_file,
        "identities_only": "yes",
    }
    fields.update(overrides)
    text = f"""
Host {RELAY_ALIAS}
    HostName 127.0.0.1
    Port {fields["relay_port"]}
    User {fields["relay_user"]}
Host {VM_ALIAS}
    HostName 127.0.0.1
    Port {fields["vm_port"]}
    User {fields["vm_user"]}
    ProxyJump {RELAY_ALIAS}
Host *
    IdentityFile {fields["identity_file"]}
    IdentitiesOnly {fields["identities_only"]}
    UserKnownHostsFile {fields["known_hosts"]}
    StrictHostKeyChecking yes
    ServerAliveInterval 5
"""
    path = directory / f"ssh_config_{uuid.uuid4().hex[:8]}"
    path.write_text(text)
    return str(path)


def relay_config(topology: Any, directory: Path, **overrides: Any) -> dict[str, Any]:
    """Provisioner config for the topology's VM, with a fresh remote work dir."""
    config: dict[str, Any] = {
        "host": VM_ALIAS,
        "ssh_config_file": write_ssh_config(topology, directory),
        "remote_python": topology.vm_python,
        "remote_workdir": f"~/rk-work-{uuid.uuid4().hex[:8]}",
        "connect_timeout_seconds": 5.0,
        "command_timeout_seconds": 10.0,
        "launch_timeout_seconds": 30.0,
        "sync_local_dir": str(_empty_folder(directory / "local-work")),  # not the tests' cwd, the repository
    }
    config.update(overrides)
    return config


def _empty_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def install_spec(directory: Path, config: dict[str, Any], name: str = "relaytest") -> KernelSpecManager:
    """Install a relay kernelspec under ``directory`` and return a manager that sees only it."""
    kernels = directory / "kernels"
    spec_dir = kernels / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    kernel_json = build_kernel_json(display_name=f"Relay test {name}", config=config)
    (spec_dir / "kernel.json").write_text(json.dumps(kernel_json))
    return KernelSpecManager(kernel_dirs=[str(kernels)])


def kernel_manager(directory: Path, config: dict[str, Any], name: str = "relaytest") -> KernelManager:
    """A KernelManager for the relay kernelspec (not started)."""
    ksm = install_spec(directory, config, name)
    return KernelManager(kernel_name=name, kernel_spec_manager=ksm)


@contextlib.contextmanager
def running_kernel(directory: Path, config: dict[str, Any], *, now: bool = False) -> Iterator[tuple[Any, Any]]:
    """A started relay kernel and its ready client (km, client); channels stopped and the kernel shut down after."""
    km = kernel_manager(directory, config)
    km.start_kernel()
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=30)
        yield km, client
    finally:
        client.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=now)


def vm_pids(topology: Any, pattern: str) -> list[int]:
    """Processes on this topology's VM whose command line contains ``pattern`` (never the pgrep command itself).

    pgrep sees every process of the machine; where the VM has a network namespace only its processes count, so
    other topologies on the same machine (and their VM user, the same account) never look like ours.
    """
    regex = f"[{pattern[0]}]{pattern[1:]}"  # a bracket keeps pgrep's own wrappers (runuser, ip netns) from matching
    found = [int(pid) for pid in topology.vm_run(["pgrep", "-f", regex]).stdout.split()]
    netns = getattr(topology, "netns", None)
    if not netns:
        return found
    listing = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10, check=False)
    ours = {int(pid) for pid in listing.stdout.split()}
    return [pid for pid in found if pid in ours]


def wait_until(predicate: Callable[[], Any], timeout_seconds: float, interval_seconds: float = 0.1) -> Any:
    """Poll until predicate() is truthy; its value, or the last falsy one after the timeout."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_seconds)


def port_accepts(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def execute(client: Any, code: str, timeout_seconds: float = 30.0) -> tuple[str, dict[str, Any]]:
    """Run code; (stdout text, execute_reply content)."""
    chunks: list[str] = []

    def collect(message: dict[str, Any]) -> None:
        if message["msg_type"] == "stream":
            chunks.append(message["content"]["text"])

    reply = client.execute_interactive(code, output_hook=collect, timeout=timeout_seconds)
    return "".join(chunks), reply["content"]


def environment_without_agent() -> dict[str, str]:
    """os.environ minus ssh-agent, so only the test's keys are offered."""
    return {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}


def wait_like_vscode(client: Any, timeout_seconds: float = 60.0, alive: Callable[[], bool] = lambda: True) -> None:
    """Readiness as VS Code checks it: kernel_info every 500 ms until a reply, then one iopub message.

    No heartbeat: VS Code judges liveness by the process, while jupyter_client's standalone check
    declares a kernel dead after one missed 1 s heartbeat, which a remote start can take.
    """
    deadline = time.monotonic() + timeout_seconds
    replied = False
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the kernel process exited while starting")
        if not replied:
            client.kernel_info()
            with contextlib.suppress(queue.Empty):
                replied = client.get_shell_msg(timeout=0.5)["msg_type"] == "kernel_info_reply"
            continue
        with contextlib.suppress(queue.Empty):
            client.get_iopub_msg(timeout=0.5)
            return
        client.kernel_info()  # iopub subscribes late: ask again so the kernel publishes a status
    raise TimeoutError(f"the kernel was not ready within {timeout_seconds:g} s")
