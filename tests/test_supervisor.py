"""The VM-side supervisor run exactly as sshd runs it: ``python -c BOOTSTRAP`` with the script on stdin."""

from __future__ import annotations

import ast
import functools
import glob
import json
import os
import selectors
import signal
import stat
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import pytest
from jupyter_client.blocking import BlockingKernelClient

from relaykernel.bundle import check_syntax, vm_program
from relaykernel.common import protocol as supervisor
from relaykernel.vm.supervisor import protocol as codes

SCRIPT = vm_program("relaykernel.vm.supervisor.main")
KEY = "test-key-" + uuid.uuid4().hex
DEBIAN_PYTHON = "/usr/bin/python3"
EVENT_TIMEOUT_SECONDS = 20.0


@functools.cache
def kernel_python() -> str:
    """Debian's python3 (ipykernel 6.17) where it has ipykernel, else the interpreter running the tests."""
    probe = [DEBIAN_PYTHON, "-c", "import ipykernel"]
    if os.path.exists(DEBIAN_PYTHON) and subprocess.run(probe, capture_output=True).returncode == 0:
        return DEBIAN_PYTHON
    return sys.executable


def oldest_supported_python() -> str | None:
    pattern = os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")
    found = glob.glob("/usr/bin/python3.8") + glob.glob(pattern)
    return found[0] if found else None


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def group_members(pgid: int) -> list[int]:
    members = []
    for stat_file in glob.glob("/proc/[0-9]*/stat"):
        with suppress(OSError, IndexError):
            if int(Path(stat_file).read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                members.append(int(stat_file.split("/")[2]))
    return members


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class SupervisorRun:
    """One supervisor process fed like an SSH exec channel; events are read line by line with a timeout."""

    def __init__(self, python: str, home: Path) -> None:
        env = dict(os.environ, HOME=str(home))  # "~" and IPython's profile land in the test's tmp dir
        self.proc = subprocess.Popen(
            [python, "-c", supervisor.BOOTSTRAP], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.pending = b""
        self.kernel_pgids: list[int] = []
        self.write(b"%d\n" % len(SCRIPT) + SCRIPT)

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, message: dict) -> None:
        self.write(json.dumps(message).encode() + b"\n")

    def event(self, timeout: float = EVENT_TIMEOUT_SECONDS) -> dict:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self.pending:
                assert selector.select(max(0.0, deadline - time.monotonic())), "no event in time"
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, f"supervisor closed stdout; exit status {self.proc.wait(5)}"
                self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        event = json.loads(line)
        if event.get("event") == "started":
            self.kernel_pgids.append(event["pgid"])
        return event

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def stop(self) -> None:
        for pgid in self.kernel_pgids:
            with suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., SupervisorRun]]:
    runs: list[SupervisorRun] = []

    def start(python: str = sys.executable) -> SupervisorRun:
        runs.append(SupervisorRun(python, tmp_path / "home"))
        return runs[-1]

    yield start
    for run in runs:
        run.stop()


@pytest.fixture
def launch_request(tmp_path: Path) -> Callable[..., dict]:
    def build(**overrides: object) -> dict:
        request = {
            "mode": "launch",
            "kernel_id": "k-" + uuid.uuid4().hex[:8],
            "key": KEY,
            "signature_scheme": "hmac-sha256",
            "python_argv": [kernel_python()],
            "kernel_module": "ipykernel_launcher",
            "workdir": str(tmp_path / "work"),
            "lease_seconds": 30.0,
            "run_root": str(tmp_path / "run"),
            "env": {"RELAYKERNEL_TEST": "1"},
            "ports_timeout_seconds": 20.0,
        }
        request.update(overrides)
        return request

    return build


@pytest.fixture
def launched(spawn: Callable[..., SupervisorRun], launch_request: Callable[..., dict]) -> Callable:
    def start(**overrides: object) -> tuple[SupervisorRun, dict, dict]:
        run, request = spawn(), launch_request(**overrides)
        run.send(request)
        started = run.event()
        assert started["event"] == "started", started
        return run, started, request

    return start


@pytest.fixture
def kernel_client() -> Iterator[Callable[[dict], BlockingKernelClient]]:
    clients: list[BlockingKernelClient] = []

    def connect(started: dict) -> BlockingKernelClient:
        client = BlockingKernelClient()
        client.load_connection_info(
            {
                "ip": "127.0.0.1",
                "transport": "tcp",
                "key": KEY.encode(),
                "signature_scheme": "hmac-sha256",
                **started["ports"],
            }
        )
        client.start_channels()
        clients.append(client)
        client.wait_for_ready(timeout=EVENT_TIMEOUT_SECONDS)
        return client

    yield connect
    for client in clients:
        client.stop_channels()
        client.context.destroy(linger=0)


def attach_request(request: dict) -> dict:
    return {"mode": "attach", "kernel_id": request["kernel_id"], "run_root": request["run_root"]}


def shut_down(run: SupervisorRun) -> dict:
    run.send({"op": "shutdown"})
    exited = run.event()
    assert run.proc.wait(10) == codes.EXIT_OK
    return exited


def test_script_is_python_38_syntax() -> None:
    ast.parse(zlib.decompress(SCRIPT), feature_version=(3, 8))
    assert "relaykernel.vm.supervisor.main" in check_syntax()


def test_started_reports_five_ports_and_keeps_files_private(launched: Callable[..., tuple]) -> None:
    run, started, request = launched()
    assert set(started["ports"]) == set(supervisor.PORT_NAMES) and all(started["ports"].values())
    run_dir = Path(started["run_dir"])
    assert run_dir.stat().st_mode & 0o777 == 0o700  # ipykernel adds the sticky bit when it rewrites the file
    assert stat.S_IMODE((run_dir / "kernel.json").stat().st_mode) == 0o600
    for pid in [run.proc.pid, *group_members(started["pgid"])]:
        assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert started["pid"] in group_members(started["pgid"])


def test_kernel_runs_in_the_requested_workdir(
    launched: Callable[..., tuple], kernel_client: Callable[[dict], BlockingKernelClient], tmp_path: Path
) -> None:
    _, started, _ = launched(workdir="~/notebooks/deep")
    outputs: list[dict] = []
    reply = kernel_client(started).execute_interactive(
        "import os; os.getcwd()", timeout=EVENT_TIMEOUT_SECONDS, output_hook=outputs.append
    )
    assert reply["content"]["status"] == "ok"
    results = [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"]
    expected = str(tmp_path / "home" / "notebooks" / "deep")
    assert started["workdir"] == expected and results == [repr(expected)]


@pytest.mark.skipif(oldest_supported_python() is None, reason="no python3.8 on this machine")
def test_supervisor_runs_on_python_38(spawn: Callable[..., SupervisorRun], launch_request: Callable) -> None:
    run = spawn(oldest_supported_python())
    run.send(launch_request())
    assert run.event()["event"] == "started"
    assert shut_down(run)["event"] == "exited"


def test_sigint_interrupts_a_running_cell(
    launched: Callable[..., tuple], kernel_client: Callable[[dict], BlockingKernelClient]
) -> None:
    run, started, _ = launched()
    client = kernel_client(started)
    msg_id = client.execute("import time; print('sleeping', flush=True); time.sleep(60)")
    # Wait for the cell's own output: a SIGINT landing before user code runs can be lost inside ipykernel.
    while client.get_iopub_msg(timeout=EVENT_TIMEOUT_SECONDS)["content"].get("text") != "sleeping\n":
        pass
    run.send({"op": "signal", "signum": int(signal.SIGINT)})
    sent_at = time.monotonic()
    assert run.event() == {"event": "signalled", "signum": int(signal.SIGINT)}
    reply = client.get_shell_msg(timeout=5)
    assert time.monotonic() - sent_at < 2.0
    assert reply["parent_header"]["msg_id"] == msg_id
    assert (reply["content"]["status"], reply["content"]["ename"]) == ("error", "KeyboardInterrupt")


def test_shutdown_stops_everything_and_leaves_a_note(
    launched: Callable[..., tuple], spawn: Callable[..., SupervisorRun]
) -> None:
    run, started, request = launched()
    exited = shut_down(run)
    assert exited["event"] == "exited" and exited["why"] == "shutdown"
    assert group_members(started["pgid"]) == [] and not Path(started["run_dir"]).exists()
    late = spawn()
    late.send(attach_request(request))
    gone = late.event()
    assert gone["event"] == "gone" and "shut down on request" in gone["message"]
    assert late.proc.wait(10) == codes.EXIT_GONE


def test_lease_expiry_stops_the_kernel(launched: Callable[..., tuple], tmp_path: Path) -> None:
    run, started, request = launched(lease_seconds=2.0)
    exited = run.event(timeout=10)
    assert exited["event"] == "exited" and exited["why"] == "lease"
    assert run.proc.wait(10) == codes.EXIT_OK
    assert not process_alive(started["pid"]) and not Path(started["run_dir"]).exists()
    note = (tmp_path / "run" / f"{request['kernel_id']}.ended").read_text()
    assert note.startswith("lease expired")


def test_renewals_keep_the_kernel_past_its_lease(launched: Callable[..., tuple]) -> None:
    run, started, _ = launched(lease_seconds=1.5)
    for _ in range(7):
        time.sleep(0.5)
        run.send({"op": "renew"})
        assert run.event()["event"] == "renewed"
    run.send({"op": "status"})
    status = run.event()
    assert status["alive"] and status["pid"] == started["pid"] and status["ports"] == started["ports"]
    shut_down(run)


def test_peeking_reports_status_without_renewing_the_lease(launched: Callable[..., tuple]) -> None:
    run, started, _ = launched(lease_seconds=2.0)
    for _ in range(3):
        run.send({"op": "peek"})
        peeked = run.event()
        assert peeked["event"] == "status" and peeked["pid"] == started["pid"] and peeked["lease_seconds"] == 2.0
        time.sleep(0.4)
    assert peeked["lease_left_seconds"] < 1.2, "a peek must not renew the lease"
    assert run.event(timeout=5)["why"] == "lease"


def test_the_notebook_environment_reaches_the_kernel(
    launched: Callable[..., tuple], kernel_client: Callable[[dict], BlockingKernelClient], tmp_path: Path
) -> None:
    env_file = tmp_path / "home/.relaykernel/notebook-env.json"
    env_file.parent.mkdir(parents=True)
    env_file.write_text(json.dumps({"LD_LIBRARY_PATH": "/usr/lib64-nvidia", "RELAYKERNEL_TEST": "notebook"}))
    _, started, _ = launched()
    outputs: list[dict] = []
    code = "import os; (os.environ['LD_LIBRARY_PATH'], os.environ['RELAYKERNEL_TEST'])"
    kernel_client(started).execute_interactive(code, timeout=EVENT_TIMEOUT_SECONDS, output_hook=outputs.append)
    results = [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"]
    assert results == [repr(("/usr/lib64-nvidia", "1"))], "the request's env must win over the notebook's"


def test_closed_stdin_leaves_the_kernel_running_for_attach(
    launched: Callable[..., tuple], spawn: Callable[..., SupervisorRun]
) -> None:
    run, started, request = launched()
    run.close_stdin()
    time.sleep(0.5)
    assert run.proc.poll() is None and process_alive(started["pid"])
    bridge = spawn()
    bridge.send(attach_request(request))
    bridge.send({"op": "status"})
    assert bridge.event()["alive"]
    assert shut_down(bridge)["why"] == "shutdown"
    assert run.proc.wait(10) == codes.EXIT_OK and not process_alive(started["pid"])


def test_attach_shares_the_running_supervisor(
    launched: Callable[..., tuple], spawn: Callable[..., SupervisorRun]
) -> None:
    run, started, request = launched()
    bridge = spawn()
    bridge.send(attach_request(request))
    bridge.send({"op": "dance"})
    assert bridge.event()["reason"] == "request"
    bridge.send({"op": "status"})
    status = bridge.event()
    assert status["event"] == "status" and status["pid"] == started["pid"]
    exited = shut_down(run)
    assert bridge.event() == exited
    assert bridge.proc.wait(10) == codes.EXIT_OK


def test_attach_to_a_missing_kernel_says_gone(spawn: Callable[..., SupervisorRun], tmp_path: Path) -> None:
    run = spawn()
    run.send({"mode": "attach", "kernel_id": "nobody", "run_root": str(tmp_path / "run")})
    gone = run.event()
    assert gone["event"] == "gone" and "no supervisor for kernel nobody" in gone["message"]
    assert run.proc.wait(10) == codes.EXIT_GONE


def test_kernel_exiting_by_itself_is_reported(
    launched: Callable[..., tuple], kernel_client: Callable[[dict], BlockingKernelClient]
) -> None:
    run, started, _ = launched()
    kernel_client(started).execute("import os; os._exit(7)")
    assert run.event() == {"event": "exited", "status": 7, "why": "kernel"}
    assert run.proc.wait(10) == codes.EXIT_OK and not Path(started["run_dir"]).exists()


def test_sigterm_to_the_supervisor_stops_the_kernel(launched: Callable[..., tuple]) -> None:
    run, started, _ = launched()
    run.proc.send_signal(signal.SIGTERM)
    assert run.event()["why"] == "terminated"
    assert run.proc.wait(10) == codes.EXIT_OK
    assert group_members(started["pgid"]) == [] and not Path(started["run_dir"]).exists()


def launch_error(spawn: Callable[..., SupervisorRun], request: dict) -> dict:
    run = spawn()
    run.send(request)
    error = run.event()
    assert error["event"] == "error", error
    assert run.proc.wait(10) == codes.EXIT_LAUNCH_FAILED
    assert not (Path(request["run_root"]) / request["kernel_id"]).exists()
    return error


def test_python_without_ipykernel_is_explained(spawn: Callable, launch_request: Callable) -> None:
    error = launch_error(spawn, launch_request(python_argv=[kernel_python(), "-S"]))  # -S hides site-packages
    assert error["reason"] == "ipykernel"
    assert "No module named" in error["message"] and "pip install ipykernel" in error["message"]


def test_missing_kernel_module_is_explained(spawn: Callable, launch_request: Callable) -> None:
    error = launch_error(spawn, launch_request(kernel_module="relaykernel_no_such_module"))
    assert error["reason"] == "ipykernel" and "relaykernel_no_such_module" in error["message"]


def test_missing_python_is_explained(spawn: Callable, launch_request: Callable) -> None:
    error = launch_error(spawn, launch_request(python_argv=["/nonexistent/python3"]))
    assert error["reason"] == "python" and "/nonexistent/python3" in error["message"]


def test_unwritable_workdir_is_explained(spawn: Callable, launch_request: Callable, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    error = launch_error(spawn, launch_request(workdir=str(tmp_path / "afile" / "sub")))
    assert error["reason"] == "workdir" and "afile" in error["message"]


@pytest.mark.parametrize("kernel_id", ["../escape", "", ".hidden", "a/b"])
def test_unsafe_kernel_id_is_refused(spawn: Callable, launch_request: Callable, kernel_id: str) -> None:
    run = spawn()
    run.send(launch_request(kernel_id=kernel_id))
    assert run.event()["reason"] == "request"
    assert run.proc.wait(10) == codes.EXIT_LAUNCH_FAILED


def test_second_launch_of_a_running_id_is_refused(
    launched: Callable[..., tuple], spawn: Callable[..., SupervisorRun]
) -> None:
    run, started, request = launched()
    second = spawn()
    second.send(request)
    error = second.event()
    assert error["reason"] == "request" and "already supervised" in error["message"]
    assert second.proc.wait(10) == codes.EXIT_LAUNCH_FAILED
    assert Path(started["run_dir"], "kernel.json").exists()
    shut_down(run)


def test_bad_env_is_refused_without_leaving_the_key(spawn: Callable, launch_request: Callable) -> None:
    error = launch_error(spawn, launch_request(env={"A=B": "x"}))
    assert error["reason"] == "request" and "environment" in error["message"]


def test_launch_replaces_a_stale_run_dir_and_forgets_old_notes(
    launched: Callable[..., tuple], tmp_path: Path
) -> None:
    run_root = tmp_path / "run"
    (run_root / "stale-id").mkdir(parents=True)
    (run_root / "stale-id" / "kernel.json").write_text("{}")
    old_note, fresh_note = run_root / "old.ended", run_root / "fresh.ended"
    old_note.write_text("kernel exited with status 0\n")
    fresh_note.write_text("kernel exited with status 0\n")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old_note, (two_days_ago, two_days_ago))
    run, started, _ = launched(kernel_id="stale-id")
    assert started["run_dir"] == str(run_root / "stale-id")
    assert not old_note.exists() and fresh_note.exists()
    shut_down(run)
