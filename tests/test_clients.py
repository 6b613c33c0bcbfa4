"""Real Jupyter clients against both launch paths: the relay provisioner and the kernelspec's argv launcher."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import pytest
import websocket
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from helpers import environment_without_agent, execute, port_accepts, relay_config, vm_pids, wait_until
from relaykernel.common.protocol import PORT_NAMES as KERNEL_PORT_NAMES
from relaykernel.kernelspec import build_kernel_json
from relaykernel.sandbox.ports import free_loopback_ports
from relaykernel.sandbox.processes import stop_process_tree

KERNEL_NAME = "relayclients"
LAUNCH_PATHS = ("provisioner", "argv")
CLEANUP_SECONDS = 10.0
VM_KERNELS = ".relaykernel/run/"
pytestmark = pytest.mark.usefixtures("no_ssh_agent")


@dataclass
class Spec:
    """The relay kernelspec installed for one launch path, in Jupyter dirs of its own."""

    path: str
    config: dict[str, Any]
    home: Path
    vm_before: set[int]
    name: str = KERNEL_NAME

    @property
    def jupyter_path(self) -> Path:
        """The JUPYTER_PATH entry holding kernels/<name>/kernel.json."""
        return self.home / "jupyter-path"

    @property
    def resource_dir(self) -> Path:
        """The kernelspec directory, {resource_dir} in the argv."""
        return self.jupyter_path / "kernels" / self.name

    @property
    def runtime_dir(self) -> Path:
        """JUPYTER_RUNTIME_DIR, where clients write connection files."""
        return self.home / "jupyter-runtime"

    def install(self) -> None:
        """Write kernel.json; the argv path drops provisioner_name so jupyter_client runs the argv itself.

        The config stays where ``relaykernel launch --spec`` reads it; without a provisioner_name jupyter_client
        uses its default local-provisioner and ignores the stanza.
        """
        kernel_json = build_kernel_json(display_name=f"Relay clients ({self.path})", config=self.config)
        if self.path == "argv":
            del kernel_json["metadata"]["kernel_provisioner"]["provisioner_name"]
        self.resource_dir.mkdir(parents=True)
        (self.resource_dir / "kernel.json").write_text(json.dumps(kernel_json))

    def manager(self) -> KernelSpecManager:
        """A KernelSpecManager that sees only this spec."""
        return KernelSpecManager(kernel_dirs=[str(self.jupyter_path / "kernels")])

    def jupyter_env(self) -> dict[str, str]:
        """JUPYTER_* (and IPython) variables that point every Jupyter tool at this spec and away from the user's."""
        dirs = {"JUPYTER_PATH": self.jupyter_path, "JUPYTER_RUNTIME_DIR": self.runtime_dir,
                "JUPYTER_CONFIG_DIR": self.home / "jupyter-config", "JUPYTER_DATA_DIR": self.home / "jupyter-data",
                "IPYTHONDIR": self.home / "ipython"}
        for directory in dirs.values():
            directory.mkdir(parents=True, exist_ok=True)
        return {key: str(value) for key, value in dirs.items()}

    def env(self) -> dict[str, str]:
        """The environment for a client subprocess: no ssh-agent, Jupyter dirs of its own."""
        return {**environment_without_agent(), **self.jupyter_env(), "PYTHONUNBUFFERED": "1"}

    def new_vm_kernels(self, topology: Any) -> list[int]:
        """Kernel processes on the VM that were not there before this test."""
        return sorted(set(vm_pids(topology, VM_KERNELS)) - self.vm_before)


@pytest.fixture(params=LAUNCH_PATHS)
def spec(request: pytest.FixtureRequest, topology: Any, tmp_path: Path) -> Iterator[Spec]:
    """The relay kernelspec, once selecting relay-provisioner and once leaving the argv to LocalProvisioner.

    Teardown kills what a failed test left on the VM, so one leak does not fail the tests after it.
    """
    installed = Spec(path=request.param, config=relay_config(topology, tmp_path), home=tmp_path,
                     vm_before=set(vm_pids(topology, VM_KERNELS)))
    installed.install()
    yield installed
    leaked = installed.new_vm_kernels(topology)
    if leaked:
        topology.vm_run(["kill", "-KILL", *map(str, leaked)])


def launcher_pids(spec: Spec) -> list[int]:
    """Local ``relaykernel launch`` processes started for this spec."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if b"launch" in argv and str(spec.resource_dir).encode() in argv:
                found.append(int(cmdline.parent.name))
    return found


def assert_launch_path(spec: Spec) -> None:
    """A launcher process runs exactly when the argv path is in use."""
    assert bool(launcher_pids(spec)) == (spec.path == "argv"), f"{spec.path} path, launchers {launcher_pids(spec)}"


def assert_nothing_left(topology: Any, spec: Spec, ports: set[int]) -> None:
    """No kernel on the VM, no launcher here, and no listener on the kernel's local ports."""
    assert ports, "the test never learned the kernel's local ports"
    assert wait_until(lambda: not spec.new_vm_kernels(topology), CLEANUP_SECONDS), (
        f"kernel left on the VM: {spec.new_vm_kernels(topology)}"
    )
    assert wait_until(lambda: not launcher_pids(spec), CLEANUP_SECONDS), f"launcher left: {launcher_pids(spec)}"
    assert wait_until(lambda: not any(port_accepts(port) for port in ports), CLEANUP_SECONDS), (
        f"local listener left on {sorted(port for port in ports if port_accepts(port))}"
    )


def remote_workdir(spec: Spec) -> str:
    """The remote work dir relative to the VM user's home, as it ends a cwd printed on the VM."""
    return spec.config["remote_workdir"].removeprefix("~/")


def connection_ports(info: dict[str, Any]) -> set[int]:
    """The five kernel ports of a connection file's content."""
    return {int(info[name]) for name in KERNEL_PORT_NAMES}


def runtime_ports(spec: Spec) -> set[int]:
    """The kernel ports in every connection file now in the spec's runtime dir."""
    ports: set[int] = set()
    for path in spec.runtime_dir.glob("kernel-*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            ports |= connection_ports(json.loads(path.read_text()))
    return ports


def run_watching_ports(spec: Spec, argv: list[str], stdin: str, timeout_seconds: float) -> tuple[str, set[int]]:
    """Run a client to its end with ``stdin``; its stdout+stderr and the kernel ports it used meanwhile."""
    log = spec.home / f"client-{uuid.uuid4().hex[:8]}.log"
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, text=True,
                                   env=spec.env(), cwd=spec.home)
    ports: set[int] = set()
    try:
        process.stdin.write(stdin)
        process.stdin.close()
        deadline = time.monotonic() + timeout_seconds
        while process.poll() is None and time.monotonic() < deadline:
            ports |= runtime_ports(spec)
            time.sleep(0.05)
        assert process.poll() is not None, f"{argv[2:4]} still running after {timeout_seconds:g} s:\n{log.read_text()}"
    finally:
        stop_process_tree(process)
    return log.read_text(), ports


def test_kernel_manager_runs_code_and_shuts_down(topology: Any, spec: Spec) -> None:
    km = KernelManager(kernel_name=spec.name, kernel_spec_manager=spec.manager())
    km.start_kernel()
    try:
        expected = "RelayProvisioner" if spec.path == "provisioner" else "LocalProvisioner"
        assert type(km.provisioner).__name__ == expected
        assert_launch_path(spec)
        ports = connection_ports(km.get_connection_info())
        client = km.client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=60)
            out, reply = execute(client, "import getpass, os; print(getpass.getuser(), os.getcwd())")
            assert reply["status"] == "ok"
            user, cwd = out.split()
            assert user == topology.vm_user
            assert cwd.endswith(remote_workdir(spec))
        finally:
            client.stop_channels()
    finally:
        km.shutdown_kernel()
    assert_nothing_left(topology, spec, ports)


def parameterized_notebook() -> nbformat.NotebookNode:
    """A notebook as papermill leaves it before execution: parameters, then injected parameters, then the work."""
    cells = [
        nbformat.v4.new_code_cell("n = 10", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("# Parameters\nn = 1000\n", metadata={"tags": ["injected-parameters"]}),
        nbformat.v4.new_code_cell("import getpass, os\ntotal = sum(range(n))\nprint(getpass.getuser(), total)"),
        nbformat.v4.new_code_cell("os.getcwd()"),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Relay clients", "language": "python"}
    nb.metadata["papermill"] = {"parameters": {"n": 1000}}
    return nb


def test_nbclient_executes_a_parameterized_notebook_like_papermill(
    topology: Any, spec: Spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in spec.jupyter_env().items():
        monkeypatch.setenv(key, value)
    seen: dict[str, Any] = {}

    def record(notebook: nbformat.NotebookNode) -> None:
        seen["ports"] = connection_ports(client.km.get_connection_info())
        seen["launchers"] = launcher_pids(spec)

    client = NotebookClient(
        parameterized_notebook(), kernel_name=spec.name, timeout=60, startup_timeout=60,
        resources={"metadata": {"path": str(tmp_path)}}, on_notebook_start=record,
    )
    client.execute()
    assert bool(seen["launchers"]) == (spec.path == "argv")
    output_path = tmp_path / "output.ipynb"
    nbformat.write(client.nb, output_path)
    written = nbformat.read(output_path, as_version=4)
    nbformat.validate(written)
    assert [cell.outputs for cell in written.cells[:2]] == [[], []]
    assert written.cells[2].outputs[0].text == f"{topology.vm_user} {sum(range(1000))}\n"
    assert written.cells[3].outputs[0].data["text/plain"].strip("'").endswith(remote_workdir(spec))
    assert_nothing_left(topology, spec, seen["ports"])


@pytest.mark.parametrize("form", ["file", "stdin"])
def test_jupyter_run_prints_the_remote_output(topology: Any, spec: Spec, form: str) -> None:
    script = spec.home / "script.py"
    script.write_text("import getpass, os\nprint('user', getpass.getuser())\nprint('cwd', os.getcwd())\n")
    argv = [sys.executable, "-m", "jupyter_client.runapp", f"--kernel={spec.name}"]
    if form == "file":
        out, ports = run_watching_ports(spec, [*argv, str(script)], stdin="", timeout_seconds=60)
    else:
        out, ports = run_watching_ports(spec, argv, stdin=script.read_text(), timeout_seconds=60)
    assert f"user {topology.vm_user}\n" in out, out
    assert f"{remote_workdir(spec)}\n" in out, out
    assert_nothing_left(topology, spec, ports)


def test_jupyter_console_runs_code_from_stdin(topology: Any, spec: Spec) -> None:
    argv = [sys.executable, "-m", "jupyter_console", f"--kernel={spec.name}", "--simple-prompt",
            "--ZMQTerminalInteractiveShell.kernel_timeout=60"]
    # jupyter console sends its first cell without checking that iopub is subscribed; piped input arrives at
    # once, and over a remote link the subscription can land after that cell's idle status, which the console
    # then waits for forever. A person cannot type that fast; a script's first line gives iopub the time.
    code = ("import time; time.sleep(1)\nimport getpass\nprint('console user', getpass.getuser())\n"
            "print('sum', sum(range(100)))\nexit\n")
    out, ports = run_watching_ports(spec, argv, stdin=code, timeout_seconds=20)
    assert f"console user {topology.vm_user}" in out, out
    assert "sum 4950" in out, out
    assert_nothing_left(topology, spec, ports)


@dataclass
class Server:
    """A jupyter_server subprocess on 127.0.0.1 and its REST API."""

    port: int
    token: str
    process: subprocess.Popen[str]
    log: Path

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 90.0) -> Any:
        """One REST call; its JSON answer (None when empty)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
        return json.loads(text) if text else None

    def ready(self) -> bool:
        """True once /api/status answers."""
        try:
            self.api("GET", "/api/status", timeout=2)
        except OSError:
            return False
        return True

    def new_session(self, name: str) -> tuple[str, str]:
        """A notebook session on the kernelspec ``name``, as JupyterLab opens one; (session id, kernel id)."""
        session = self.api("POST", "/api/sessions", {"path": "x.ipynb", "type": "notebook", "kernel": {"name": name}})
        return session["id"], session["kernel"]["id"]

    def channels(self, kernel_id: str) -> Channels:
        """The kernel's websocket, as JupyterLab opens it."""
        url = f"ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels?token={self.token}"
        return Channels(websocket.create_connection(url, timeout=30))

    def stop(self) -> None:
        """Shut the server down over REST, as its UI does, and wait for it to exit cleanly."""
        self.api("POST", "/api/shutdown")
        assert self.process.wait(timeout=60) == 0, self.log.read_text()


@contextlib.contextmanager
def jupyter_server(spec: Spec) -> Iterator[Server]:
    """Run jupyter_server for the spec's Jupyter dirs; kill its process tree if the test did not stop it."""
    (port,) = free_loopback_ports(1)
    root = spec.home / "server-root"
    root.mkdir()
    log = spec.home / "server.log"
    token = uuid.uuid4().hex
    argv = [sys.executable, "-m", "jupyter_server", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0", "--ServerApp.open_browser=False", "--ServerApp.allow_root=True",
            f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}"]
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, text=True,
                                   env=spec.env(), cwd=spec.home)
    server = Server(port, token, process, log)
    try:
        assert wait_until(lambda: server.ready() or process.poll() is not None, 60), log.read_text()
        assert process.poll() is None, log.read_text()
        yield server
    finally:
        stop_process_tree(process)


def _summary(message: dict[str, Any]) -> str:
    """One line per message, for failure reports."""
    content = message.get("content", {})
    detail = content.get("execution_state") or content.get("text") or content.get("status") or ""
    return f"{message.get('channel')} {message['msg_type']} {detail!r} parent={message['parent_header'].get('msg_id')}"


@dataclass
class Channels:
    """A kernel's websocket: JSON messages tagged with their channel, as a browser sends them (no signing)."""

    ws: websocket.WebSocket
    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    history: list[str] = field(default_factory=list)

    def send(self, msg_type: str, content: dict[str, Any]) -> str:
        """Send a shell request; its msg_id."""
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": msg_type, "session": self.session, "username": "test",
                  "version": "5.3", "date": ""}
        self.ws.send(json.dumps({"header": header, "parent_header": {}, "metadata": {}, "content": content,
                                 "channel": "shell", "buffers": []}))
        return msg_id

    def execute(self, code: str) -> str:
        """Send an execute_request; its msg_id."""
        return self.send("execute_request", {"code": code, "silent": False, "store_history": True,
                                             "user_expressions": {}, "allow_stdin": False, "stop_on_error": True})

    def receive(self, deadline: float) -> dict[str, Any]:
        """The next JSON message (binary frames, which carry buffers, are skipped)."""
        while True:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                frame = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                seen = "\n".join(self.history[-20:])
                raise AssertionError(f"the kernel websocket went quiet; it last saw:\n{seen}") from None
            if isinstance(frame, str):
                message = json.loads(frame)
                self.history.append(_summary(message))
                return message

    def wait_for(self, msg_id: str, msg_type: str, timeout_seconds: float) -> dict[str, Any]:
        """The first message of ``msg_type`` answering ``msg_id``."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            message = self.receive(deadline)
            if message["parent_header"].get("msg_id") == msg_id and message["msg_type"] == msg_type:
                return message

    def collect(self, msg_id: str, timeout_seconds: float = 30.0) -> tuple[str, dict[str, Any]]:
        """Stdout and the execute_reply content of one request, once the kernel is idle after it."""
        deadline = time.monotonic() + timeout_seconds
        chunks: list[str] = []
        reply: dict[str, Any] | None = None
        idle = False
        while reply is None or not idle:
            message = self.receive(deadline)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "stream":
                chunks.append(message["content"]["text"])
            elif message["msg_type"] == "execute_reply":
                reply = message["content"]
            elif message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                idle = True
        return "".join(chunks), reply

    def run(self, code: str, timeout_seconds: float = 30.0) -> tuple[str, dict[str, Any]]:
        """Execute code; its stdout and execute_reply content."""
        return self.collect(self.execute(code), timeout_seconds)

    def kernel_info(self, timeout_seconds: float = 60.0) -> None:
        """Wait for a kernel_info_reply, as JupyterLab does before it runs anything."""
        self.wait_for(self.send("kernel_info_request", {}), "kernel_info_reply", timeout_seconds)

    def settle(self, timeout_seconds: float = 60.0) -> None:
        """Ask kernel_info until iopub carries its status too, as jupyter_server's nudge does on connect."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            msg_id = self.send("kernel_info_request", {})
            with contextlib.suppress(AssertionError):
                self.wait_for(msg_id, "status", 0.5)
                return
        raise AssertionError(f"iopub stayed silent for {timeout_seconds:g} s")


def test_jupyter_server_runs_interrupts_restarts_and_stops(topology: Any, spec: Spec) -> None:
    with jupyter_server(spec) as server:
        session_id, kernel_id = server.new_session(spec.name)
        ports = runtime_ports(spec)
        assert_launch_path(spec)
        channels = server.channels(kernel_id)
        try:
            channels.kernel_info()
            out, reply = channels.run("import getpass, os; print(getpass.getuser(), os.getcwd())")
            assert reply["status"] == "ok", reply
            user, cwd = out.split()
            assert user == topology.vm_user
            assert cwd.endswith(remote_workdir(spec))

            sleeping = channels.execute("import time; print('sleeping', flush=True); time.sleep(60)")
            channels.wait_for(sleeping, "stream", 30)
            server.api("POST", f"/api/kernels/{kernel_id}/interrupt")
            _, reply = channels.collect(sleeping, timeout_seconds=10)
            assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply

            channels.run("answer = 42")
            server.api("POST", f"/api/kernels/{kernel_id}/restart")
            ports |= runtime_ports(spec)
            channels.settle()
            out, _ = channels.run("print('answer' in globals())")
            assert out == "False\n"
        finally:
            channels.ws.close()
        server.api("DELETE", f"/api/sessions/{session_id}")
        assert server.api("GET", "/api/kernels") == []
        assert_nothing_left(topology, spec, ports)

        server.api("POST", "/api/kernels", {"name": spec.name})
        ports |= runtime_ports(spec)
        assert wait_until(lambda: spec.new_vm_kernels(topology), 30), "the second kernel never reached the VM"
        server.stop()
    assert_nothing_left(topology, spec, ports)


def test_jupyter_server_restart_then_run_at_once(topology: Any, spec: Spec) -> None:
    """JupyterLab's "Restart and Run All": kernel_info, then execute at once; its output must not be lost."""
    with jupyter_server(spec) as server:
        _, kernel_id = server.new_session(spec.name)
        channels = server.channels(kernel_id)
        try:
            channels.kernel_info()
            channels.run("answer = 42")
            server.api("POST", f"/api/kernels/{kernel_id}/restart")
            ports = runtime_ports(spec)
            channels.kernel_info()
            out, _ = channels.run("print('answer' in globals())", timeout_seconds=5)
            assert out == "False\n"
        finally:
            channels.ws.close()
        server.stop()
    assert_nothing_left(topology, spec, ports)
