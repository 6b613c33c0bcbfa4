"""`relaykernel install` then the doctor command it prints, against the real topology: passes, or names the hop."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from helpers import VM_ALIAS, write_ssh_config

pytestmark = pytest.mark.usefixtures("no_ssh_agent")


def relaykernel(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaykernel", *args], capture_output=True, text=True, timeout=120,
                          check=False, env=env)


def install_then_doctor(topology, tmp_path: Path, *flags: str, vm_port: int | None = None,
                        on_path: bool = True) -> subprocess.CompletedProcess[str]:
    """Install a kernelspec as a user would, then run exactly the doctor command install printed."""
    ssh_config = write_ssh_config(topology, tmp_path, **({"vm_port": vm_port} if vm_port else {}))
    name = f"doc{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "JUPYTER_PATH": str(tmp_path / "share" / "jupyter")} if on_path else dict(os.environ)
    installed = relaykernel("install", "--name", name, "--host", VM_ALIAS, "--ssh-config", ssh_config,
                            "--remote-python", topology.vm_python, "--remote-workdir", f"~/rk-doc-{name}",
                            "--prefix", str(tmp_path), *flags, env=env)
    assert installed.returncode == 0, installed.stderr
    printed = re.search(r"^  (relaykernel doctor .*)$", installed.stdout, re.MULTILINE)
    assert printed, installed.stdout
    argv = shlex.split(printed.group(1))
    assert argv[2] == name and ("--spec" in argv) != on_path
    return relaykernel(*argv[1:], env=env)


def test_the_printed_doctor_command_passes_on_a_working_path(topology, tmp_path):
    result = install_then_doctor(topology, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "kernelspec" in lines[0] and VM_ALIAS in lines[0], "doctor says which settings it checks"
    for check in ("relay reachable", "relay auth", "VM forwarded port open", "VM host key", "VM auth",
                  "remote python + ipykernel", "remote work dir writable", "VM cell version", "GPU"):
        assert any(line.startswith("ok") and check in line for line in lines), (check, result.stdout)


def test_a_spec_outside_jupyters_path_gets_a_doctor_command_that_names_its_folder(topology, tmp_path):
    result = install_then_doctor(topology, tmp_path, on_path=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_doctor_names_the_vm_hop_when_the_tunnel_is_down(topology, tmp_path):
    result = install_then_doctor(topology, tmp_path, vm_port=1)  # nothing listens where the tunnel should
    assert result.returncode == 1
    assert "ok   relay auth" in result.stdout
    assert "FAIL VM forwarded port open" in result.stdout and "fix:" in result.stdout


def test_doctor_names_a_python_without_ipykernel(topology, tmp_path):
    result = install_then_doctor(topology, tmp_path, "--remote-python", f"{topology.vm_python} -S")
    assert result.returncode == 1
    assert "FAIL remote python + ipykernel" in result.stdout and "pip install ipykernel" in result.stdout


def test_doctor_names_a_work_dir_it_cannot_write(topology, tmp_path):
    result = install_then_doctor(topology, tmp_path, "--remote-workdir", "/proc/relaykernel-cannot-be-here")
    assert result.returncode == 1
    assert "FAIL remote work dir writable" in result.stdout and "/proc/relaykernel-cannot-be-here" in result.stdout
    assert "ok   remote python + ipykernel" in result.stdout


def test_doctor_still_takes_a_destination(topology, tmp_path):
    config = write_ssh_config(topology, tmp_path)
    result = relaykernel("doctor", VM_ALIAS, "--ssh-config", config, "--remote-python", topology.vm_python)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a destination" in result.stdout.splitlines()[0]


def test_doctor_names_both_versions_when_the_vms_cell_speaks_another_protocol(topology, tmp_path):
    from relaykernel import __version__
    from relaykernel.common.protocol import PROTOCOL_VERSION

    older = json.dumps({"relaykernel": "0.0.9", "protocol": PROTOCOL_VERSION - 1})
    write = f"mkdir -p ~/.relaykernel && printf '%s' {shlex.quote(older)} > ~/.relaykernel/cell.json"
    assert topology.vm_run(["sh", "-c", write]).returncode == 0
    try:
        result = install_then_doctor(topology, tmp_path)
    finally:
        topology.vm_run(["sh", "-c", "rm -f ~/.relaykernel/cell.json"])
    assert result.returncode == 1
    line = next(line for line in result.stdout.splitlines() if "VM cell version" in line)
    assert line.startswith("FAIL") and "0.0.9" in line and __version__ in line and "rerun the cell" in line
