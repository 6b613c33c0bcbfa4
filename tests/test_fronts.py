"""Every front the same: one config file read by all, the client's arguments passed on, the debugger through the relay.

Against the real topology: the provisioner (KernelManager, nbclient, jupyter_server), `relaykernel launch` driven as
VS Code drives it, and `doctor`.
"""

from __future__ import annotations

import itertools
import json
import queue
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import (
    VM_ALIAS,
    environment_without_agent,
    execute,
    install_spec,
    kernel_manager,
    relay_config,
    running_kernel,
    vm_pids,
    write_ssh_config,
)
from relaykernel.kernelspec import build_kernel_json
from test_clients import Spec, jupyter_server
from vscode import VSCodeKernel

pytestmark = pytest.mark.usefixtures("no_ssh_agent")
CONFIG_LINE = "c.RelayOptions.lease_seconds = 42\n"
# Peek at every supervisor of the VM user (the one control line that does not renew a lease): its lease_seconds.
PEEK = r"""
import glob, json, os, socket
for run_dir in glob.glob(os.path.expanduser("~/.relaykernel/run/*/")):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    try:
        os.chdir(run_dir)
        client.connect("control.sock")
        client.sendall(b'{"op": "peek"}\n')
        answers = client.makefile()
        for line in iter(answers.readline, ""):
            if "lease_seconds" in line:
                print(line.strip())
                break
    except OSError:
        pass
    finally:
        client.close()
"""


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A JUPYTER_CONFIG_DIR holding ``c.RelayOptions.lease_seconds = 42``, for this process and its children."""
    directory = tmp_path / "jupyter-config"
    directory.mkdir()
    (directory / "jupyter_relaykernel_config.py").write_text(CONFIG_LINE)
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(directory))
    return directory


def vm_leases(topology: Any) -> list[float]:
    """lease_seconds of every live supervisor on the VM, as the VM side reports it."""
    result = topology.vm_run([topology.vm_python, "-c", PEEK])
    leases = []
    for line in result.stdout.splitlines():
        try:
            leases.append(float(json.loads(line)["lease_seconds"]))
        except (ValueError, KeyError):
            continue
    return leases


# --- c.RelayOptions.lease_seconds = 42 in a Jupyter config file, in every front ---------------------------------

def test_the_provisioner_reads_the_config_file(topology, tmp_path, config_dir):
    km = kernel_manager(tmp_path, relay_config(topology, tmp_path))
    km.start_kernel()
    try:
        assert km.provisioner.lease_seconds == 42
        assert 42.0 in vm_leases(topology), "the VM's supervisor runs the kernel under the configured lease"
    finally:
        km.shutdown_kernel(now=True)


def test_jupyter_server_reads_its_config_and_logs_relaykernel_lines(topology, tmp_path):
    spec = Spec(path="provisioner", config=relay_config(topology, tmp_path), home=tmp_path,
                vm_before=set(vm_pids(topology, ".relaykernel/run/")))
    spec.install()
    config_home = Path(spec.jupyter_env()["JUPYTER_CONFIG_DIR"])
    (config_home / "jupyter_server_config.py").write_text(CONFIG_LINE)
    with jupyter_server(spec) as server:
        session_id, _ = server.new_session(spec.name)
        assert 42.0 in vm_leases(topology), "the server's c.RelayOptions reached the provisioner"
        server.api("DELETE", f"/api/sessions/{session_id}")
        server.stop()
        log = server.log.read_text()
    ours = [line for line in log.splitlines() if " relaykernel." in line]
    assert ours, log
    for line in ours:  # the server's own layout: [L yyyy-mm-dd hh:mm:ss.mmm name] message
        assert re.match(r"^\[[DIWEC] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} relaykernel\.[\w.]+\] \S", line), line
    assert any(line.startswith("[I ") for line in ours), "info lines reach the server's log at its level"


def vscode_kernel(topology: Any, tmp_path: Path, config: dict[str, Any], appended: list[str]) -> VSCodeKernel:
    """A VS Code-style kernel whose kernelspec argv carries ``appended`` after relaykernel's own arguments."""
    spec_dir = tmp_path / "vsrelay"
    spec_dir.mkdir()
    kernel_json = build_kernel_json(display_name="Relay fronts", config=config)
    kernel_json["argv"] += appended
    (spec_dir / "kernel.json").write_text(json.dumps(kernel_json))
    runtime, notebooks = tmp_path / "runtime", tmp_path / "notebooks"
    runtime.mkdir()
    notebooks.mkdir()
    return VSCodeKernel(spec_dir, runtime_dir=runtime, notebook_dir=notebooks, env=environment_without_agent())


def test_launch_reads_the_config_file(topology, tmp_path, config_dir):
    kernel = vscode_kernel(topology, tmp_path, relay_config(topology, tmp_path), [])
    kernel.launch()
    try:
        assert 42.0 in vm_leases(topology), kernel.stderr_text()
    finally:
        kernel.dispose()


def doctor(topology: Any, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relaykernel", "doctor", VM_ALIAS, "--ssh-config", write_ssh_config(topology, tmp_path),
         "--debug"], capture_output=True, text=True, timeout=120, check=False)


def test_doctor_reads_the_config_file_and_checks_the_debugger(topology, tmp_path, config_dir):
    result = doctor(topology, tmp_path)
    assert "option lease_seconds = 42.0 (from a Jupyter config file)" in result.stderr, result.stderr
    assert re.search(r"relaykernel\.step\] relaykernel doctor: done in \d+\.\d{3} s", result.stderr), result.stderr
    assert result.returncode == 0 and re.search(r"^ok +debugger .* available$", result.stdout, re.M), result.stdout
    (config_dir / "jupyter_relaykernel_config.py").write_text(
        CONFIG_LINE + f"c.RelayOptions.remote_python = '{topology.vm_python} -S'\n")  # -S: no site, no ipykernel
    result = doctor(topology, tmp_path)
    assert result.returncode == 1 and "FAIL remote python + ipykernel" in result.stdout, result.stdout


# --- the client's arguments ----------------------------------------------------------------------------------------

def test_nbclients_check_history_in_memory_notebook_passes(topology, tmp_path, monkeypatch):
    # nbclient's own tests/files/Check History in Memory.ipynb: nbclient adds --HistoryManager.hist_file=:memory:
    # to a kernel's extra_arguments only for kernels named python, python2 or python3.
    source = "from IPython import get_ipython\n\nip = get_ipython()\nassert ip.history_manager.hist_file == ':memory:'"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    install_spec(tmp_path, relay_config(topology, tmp_path), name="python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))  # kernels/python3 there wins over any other python3
    NotebookClient(notebook, kernel_name="python3", timeout=60, startup_timeout=60).execute()
    assert notebook.cells[0].outputs == []


def test_a_vscode_style_launch_passes_appended_arguments_on_word_for_word(topology, tmp_path):
    appended = ["--HistoryManager.hist_file=:memory:", "--IPKernelApp.exec_lines=relaykernel_probe = 'a b;$c'"]
    kernel = vscode_kernel(topology, tmp_path, relay_config(topology, tmp_path), appended)
    kernel.launch()
    try:
        out, _ = execute(kernel.client, "print(get_ipython().history_manager.hist_file, repr(relaykernel_probe))")
        assert out.strip() == ":memory: 'a b;$c'", kernel.stderr_text()
    finally:
        kernel.dispose()


# --- the debugger through the relay --------------------------------------------------------------------------------

MODULE = "def compute():\n    answer = 6 * 7\n    return answer\n"  # a breakpoint on line 3 sees answer == 42


class Debugger:
    """Debug Adapter Protocol over the kernel's control channel, as JupyterLab speaks it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.seq = itertools.count(1)

    def request(self, command: str, timeout_seconds: float = 30.0, **arguments: Any) -> dict[str, Any]:
        message = self.client.session.msg("debug_request", {"type": "request", "seq": next(self.seq),
                                                            "command": command, "arguments": arguments})
        self.client.control_channel.send(message)
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            reply = self.client.get_control_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == message["header"]["msg_id"]:
                assert reply["content"].get("success", True), reply["content"]
                return reply["content"]
        raise TimeoutError(f"no reply to {command}")

    def event(self, name: str, timeout_seconds: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            try:
                message = self.client.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if message["msg_type"] == "debug_event" and message["content"].get("event") == name:
                return message["content"]
        raise TimeoutError(f"no {name} event")


def test_a_breakpoint_on_the_vm_stops_and_reports_the_local_source(topology, tmp_path):
    config = relay_config(topology, tmp_path)
    local_module = Path(config["sync_local_dir"]) / "relaymod.py"
    local_module.write_text(MODULE)
    with running_kernel(tmp_path, config, now=True) as (km, client):
        out, _ = execute(client, "import os; print(os.path.join(os.getcwd(), 'relaymod.py'))")
        remote_module = out.strip()
        debugger = Debugger(client)
        debugger.request("initialize", clientID="test", clientName="test", adapterID="python", pathFormat="path",
                         linesStartAt1=True, columnsStartAt1=True, supportsVariableType=True,
                         supportsVariablePaging=True, supportsRunInTerminalRequest=True, locale="en")
        debugger.request("attach")
        assert "hashMethod" in debugger.request("debugInfo")["body"]
        breakpoints = debugger.request("setBreakpoints", source={"path": remote_module}, breakpoints=[{"line": 3}],
                                       sourceModified=False)["body"]["breakpoints"]
        assert breakpoints[0]["verified"], breakpoints
        debugger.request("configurationDone")
        running = client.execute("import relaymod; print('result', relaymod.compute())")
        stopped = debugger.event("stopped")
        thread = stopped["body"]["threadId"]
        frame = debugger.request("stackTrace", threadId=thread)["body"]["stackFrames"][0]
        assert (frame["source"]["path"], frame["line"]) == (remote_module, 3), frame
        assert km.resolve_path(frame["source"]["path"]) == str(local_module.resolve()), "mapped to the local file"
        scopes = debugger.request("scopes", frameId=frame["id"])["body"]["scopes"]
        local_vars = debugger.request("variables", variablesReference=scopes[0]["variablesReference"])["body"]
        assert {"name": "answer", "value": "42"}.items() <= next(
            v for v in local_vars["variables"] if v["name"] == "answer").items(), local_vars
        debugger.request("continue", threadId=thread)
        reply = client.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == running and reply["content"]["status"] == "ok", reply
        debugger.request("disconnect", restart=False, terminateDebuggee=True)
