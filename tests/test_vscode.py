"""The argv launch path driven exactly as VS Code drives it: ports from 9000, signals, restart by relaunch."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import (
    RELAY_ALIAS,
    VM_ALIAS,
    environment_without_agent,
    execute,
    relay_config,
    vm_pids,
    wait_until,
    write_ssh_config,
)
from relaykernel.kernelspec import build_kernel_json, check_kernel_json, install_kernelspec
from vscode import VSCodeKernel, listening

pytestmark = pytest.mark.usefixtures("no_ssh_agent")
REMOTE_KERNELS = ".relaykernel/run/"
AT_ONCE_SECONDS = 5.0


def install_for_vscode(tmp_path: Path, config: dict) -> Path:
    """Install a relay kernelspec the way `relaykernel install` does; its directory."""
    spec = build_kernel_json(display_name=f"Relay {tmp_path.name}", config=config)
    assert check_kernel_json(spec) == []
    return Path(install_kernelspec(name="vsrelay", kernel_json=spec, prefix=str(tmp_path / "prefix")))


def open_kernel(topology, tmp_path: Path, env: dict[str, str] | None = None, **overrides) -> VSCodeKernel:
    """A VSCodeKernel (not launched) for the topology's VM; the notebook folder has a space in its name."""
    spec_dir = install_for_vscode(tmp_path, relay_config(topology, tmp_path, **overrides))
    runtime, notebooks = tmp_path / "runtime", tmp_path / "my notebooks"
    runtime.mkdir()
    notebooks.mkdir()
    return VSCodeKernel(spec_dir, runtime_dir=runtime, notebook_dir=notebooks,
                        env=env or environment_without_agent())


@pytest.fixture
def vscode_kernel(topology, tmp_path):
    kernel = open_kernel(topology, tmp_path, lease_seconds=120.0)
    yield kernel
    kernel.dispose()


def remote_kernels(topology) -> list[int]:
    return vm_pids(topology, REMOTE_KERNELS)


def gone_from_vm(topology, pid: int) -> bool:
    return pid not in remote_kernels(topology)


def kernel_pid(client) -> int:
    out, _ = execute(client, "import os; print(os.getpid())")
    return int(out)


def interrupt_a_sleep(kernel: VSCodeKernel) -> float:
    """Start time.sleep(60), interrupt it as the extension does; seconds until the KeyboardInterrupt reply."""
    client = kernel.client
    # stop_on_error=False: else ipykernel aborts the next request if it arrives right after the interrupted one
    msg_id = client.execute("import time; print('sleeping', flush=True); time.sleep(60)", stop_on_error=False)
    wait_until(lambda: client.get_iopub_msg(timeout=5)["msg_type"] == "stream", 10)
    started = time.monotonic()
    kernel.interrupt()
    reply = client.get_shell_msg(timeout=10)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    return time.monotonic() - started


def test_a_vscode_session_from_launch_to_dispose(topology, vscode_kernel):
    kernel = vscode_kernel
    kernel.launch()
    out, _ = execute(kernel.client, "import getpass, os; print(getpass.getuser()); print(os.getcwd()); x = 1")
    user, cwd = out.split()
    assert user == topology.vm_user and "rk-work-" in cwd
    first_pid = kernel_pid(kernel.client)

    assert interrupt_a_sleep(kernel) < 2.0
    assert kernel.process.poll() is None, "an interrupt must not end the launcher"
    out, reply = execute(kernel.client, "print(x)")
    assert (out.strip(), reply["status"]) == ("1", "ok"), reply
    assert kernel_pid(kernel.client) == first_pid

    old_ports = kernel.restart()
    assert set(kernel.ports.values()).isdisjoint(old_ports.values())
    assert not listening(old_ports), "the old launcher's ports are still open"
    assert wait_until(lambda: gone_from_vm(topology, first_pid), AT_ONCE_SECONDS), "old kernel left"
    out, _ = execute(kernel.client, "print('x' in globals())")
    assert out.strip() == "False"

    ports, last_pid = dict(kernel.ports), kernel_pid(kernel.client)
    assert kernel.dispose() == 0
    assert not listening(ports)
    assert wait_until(lambda: gone_from_vm(topology, last_pid), AT_ONCE_SECONDS), "SIGTERM left the kernel"


def test_sigkill_leaves_the_kernel_to_its_lease(topology, tmp_path):
    kernel = open_kernel(topology, tmp_path, lease_seconds=4.0, liveness_interval_seconds=1.0)
    try:
        kernel.launch()
        pid = kernel_pid(kernel.client)
        kernel.client.stop_channels()
        kernel.client = None
        kernel.process.send_signal(signal.SIGKILL)
        kernel.process.wait()
        assert not gone_from_vm(topology, pid), "the kernel must outlive a vanished laptop for its lease"
        assert wait_until(lambda: gone_from_vm(topology, pid), 4.0 + 6.0), "kernel outlived its lease"
    finally:
        kernel.dispose()


def test_the_launcher_ends_with_its_parent(topology, tmp_path):
    parent = subprocess.Popen(["sleep", "600"])
    try:
        kernel = open_kernel(topology, tmp_path, env=environment_without_agent() | {"JPY_PARENT_PID": str(parent.pid)})
        kernel.launch()
        process, pid = kernel.process, kernel_pid(kernel.client)
        parent.kill()
        parent.wait()
        assert process.wait(timeout=10) == 0
        assert not listening(kernel.ports)
        assert wait_until(lambda: gone_from_vm(topology, pid), AT_ONCE_SECONDS)
        kernel.dispose()
    finally:
        parent.kill()
        parent.wait()


def test_a_kernel_that_dies_on_the_vm_ends_the_launcher_with_its_status(topology, vscode_kernel):
    kernel = vscode_kernel
    kernel.launch()
    pid = kernel_pid(kernel.client)
    topology.vm_run(["kill", "-KILL", str(pid)])
    assert kernel.process.wait(timeout=15) == 128 + signal.SIGKILL
    assert "the kernel on the VM exited" in kernel.stderr_text()
    assert not listening(kernel.ports)


def test_a_start_failure_is_a_short_paragraph_not_a_traceback(topology, tmp_path):
    kernel = open_kernel(topology, tmp_path, ssh_config_file=write_ssh_config(topology, tmp_path, vm_port=1))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="the kernel died"):
        kernel.launch()
    assert time.monotonic() - started < 20
    assert kernel.process.wait(timeout=5) != 0
    text = kernel.stderr_text()
    assert "relaykernel:" in text and "fix:" in text and "Traceback" not in text, text
    assert not listening(kernel.ports)
    kernel.dispose()


def test_a_proxycommand_route_survives_interrupts_and_stops_cleanly(topology, tmp_path):
    """The extension signals every descendant: a ProxyCommand's ssh must neither die of SIGINT nor strand the kernel."""
    config = write_ssh_config(topology, tmp_path)
    text = Path(config).read_text().replace(
        f"ProxyJump {RELAY_ALIAS}", f"ProxyCommand ssh -F {config} -W %h:%p {RELAY_ALIAS}"
    )
    Path(config).write_text(text)
    kernel = open_kernel(topology, tmp_path, host=VM_ALIAS, ssh_config_file=config, lease_seconds=120.0)
    try:
        kernel.launch()
        execute(kernel.client, "y = 2")
        pid = kernel_pid(kernel.client)
        assert interrupt_a_sleep(kernel) < 2.0
        out, _ = execute(kernel.client, "print(y)", timeout_seconds=15)
        assert out.strip() == "2"
        assert kernel.dispose() == 0
        assert wait_until(lambda: gone_from_vm(topology, pid), AT_ONCE_SECONDS), "kernel left on the VM"
    finally:
        kernel.dispose()
