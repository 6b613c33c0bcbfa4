"""The command line against the real topology: doctor, demo, a stock kernelspec, and the argv launch path."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from jupyter_client import BlockingKernelClient, KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from traitlets.config import Config

from helpers import (
    VM_ALIAS,
    execute,
    port_accepts,
    relay_config,
    vm_pids,
    wait_like_vscode,
    wait_until,
    write_ssh_config,
)
from relaykernel.common.protocol import PORT_NAMES as KERNEL_PORT_NAMES
from relaykernel.sandbox.ports import free_loopback_ports

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("no_ssh_agent")


def relaykernel(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relaykernel", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_doctor_reports_every_hop(topology, tmp_path):
    config = write_ssh_config(topology, tmp_path)
    result = relaykernel("doctor", VM_ALIAS, "--ssh-config", config, "--remote-python", topology.vm_python)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for check in ("relay reachable", "relay auth", "VM forwarded port open", "VM host key", "VM auth",
                  "remote python + ipykernel", "remote work dir writable", "GPU"):
        assert any(line.startswith("ok") and check in line for line in lines), (check, result.stdout)


def test_doctor_names_the_failing_hop_and_the_fix(topology, tmp_path):
    config = write_ssh_config(topology, tmp_path, vm_port=1)
    result = relaykernel("doctor", VM_ALIAS, "--ssh-config", config)
    assert result.returncode == 1
    assert "ok   relay auth" in result.stdout
    assert "FAIL VM forwarded port open" in result.stdout and "fix:" in result.stdout


def test_doctor_without_ipykernel(topology, tmp_path):
    config = write_ssh_config(topology, tmp_path)
    result = relaykernel("doctor", VM_ALIAS, "--ssh-config", config, "--remote-python", f"{topology.vm_python} -S")
    assert result.returncode == 1
    assert "FAIL remote python + ipykernel" in result.stdout and "pip install ipykernel" in result.stdout


def test_demo_prints_the_remote_outputs_and_cleans_up():
    result = relaykernel("demo", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "remote user:" in result.stdout and "remote cwd:" in result.stdout
    assert "computed on the VM: 333332833333500000" in result.stdout
    assert "hello from a module in your local folder, synced to the VM" in result.stdout
    assert "nothing left running" in result.stdout
    vm_port = re.search(r"-> VM sshd 127\.0\.0\.1:(\d+)", result.stdout)
    assert vm_port and "reverse-forwarded by the VM's own `ssh -R`" in result.stdout
    arrived = re.search(r"session at the VM sshd \(from ip port, to ip port\): (\S+) (\d+) (\S+) (\d+)", result.stdout)
    assert arrived and arrived.group(4) == vm_port.group(1), "the kernel's session must end at the VM sshd"
    if os.geteuid() == 0:  # the VM gets a network namespace and a host name of its own
        assert "remote host: relaykernel-demo-vm" in result.stdout and "only its own loopback" in result.stdout
    else:
        assert "simulated:" in result.stdout


def test_a_stock_kernelspec_works_once_ssh_config_names_its_host(topology, tmp_path):
    subprocess.run(
        [sys.executable, "-m", "jupyter", "kernelspec", "install", str(REPO / "kernelspecs" / "generic"),
         "--prefix", str(tmp_path)], check=True, capture_output=True,
    )
    ssh_config = Path(write_ssh_config(topology, tmp_path))
    ssh_config.write_text(ssh_config.read_text().replace(f"Host {VM_ALIAS}", "Host notebook-vm"))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "share/jupyter/kernels")])
    config = Config({"RelayOptions": {"ssh_config_file": str(ssh_config), "sync_local_dir": "none"}})
    km = KernelManager(kernel_name="generic", kernel_spec_manager=ksm, config=config)
    km.start_kernel()
    try:
        client = km.client()
        client.start_channels()
        client.wait_for_ready(timeout=30)
        out, _ = execute(client, "import os; print(os.getcwd())")
        assert out.strip().endswith("/relaykernel")
        client.stop_channels()
    finally:
        km.shutdown_kernel()


def test_the_argv_launch_path_runs_interrupts_and_stops_on_sigterm(topology, tmp_path):
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    config = relay_config(topology, tmp_path)
    (spec_dir / "kernel.json").write_text(json.dumps({"metadata": {"kernel_provisioner": {"config": config}}}))
    ports = dict(zip(KERNEL_PORT_NAMES, free_loopback_ports(5)))
    info = {**ports, "ip": "127.0.0.1", "key": str(uuid.uuid4()), "transport": "tcp",
            "signature_scheme": "hmac-sha256", "kernel_name": "relay"}
    connection_file = tmp_path / "kernel-v3 with space.json"
    connection_file.write_text(json.dumps(info))
    launcher = subprocess.Popen(
        [sys.executable, "-m", "relaykernel", "launch", "--spec", str(spec_dir), "-f", f'"{connection_file}"'],
        cwd=tmp_path, env={**os.environ, "JPY_PARENT_PID": str(os.getpid())}, stderr=subprocess.PIPE, text=True,
    )
    client = BlockingKernelClient()
    client.load_connection_info(info)
    try:
        # as VS Code does: shell and iopub accept TCP first, then kernel_info until a reply
        assert wait_until(lambda: all(port_accepts(ports[n]) for n in ("shell_port", "iopub_port")), 60)
        client.start_channels()
        wait_like_vscode(client)
        out, _ = execute(client, "print(6 * 7)")
        assert out.strip() == "42"
        client.execute("import time; print('sleeping', flush=True); time.sleep(60)")
        wait_until(lambda: client.get_iopub_msg(timeout=5)["msg_type"] == "stream", 10)
        launcher.send_signal(signal.SIGINT)
        reply = client.get_shell_msg(timeout=10)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 0
    finally:
        client.stop_channels()
        launcher.kill()
        launcher.wait()
        errors = launcher.stderr.read()
        launcher.stderr.close()
    assert not any(port_accepts(port) for port in ports.values())
    assert wait_until(lambda: not vm_pids(topology, ".relaykernel/run/"), 10), (
        f"kernel left on the VM: {topology.vm_run(['pgrep', '-af', '[.]relaykernel']).stdout} {errors}")
