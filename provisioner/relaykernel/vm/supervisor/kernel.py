"""The kernel process: its work dir, connection file, environment, start, ports and stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

from ...common.protocol import NOTEBOOK_ENV_FILE, PORT_NAMES
from .protocol import RequestError
from .rundir import CONNECTION_FILE, KERNEL_LOG, RunDir, log

SHUTDOWN_GRACE_SECONDS = 3.0
PORT_POLL_SECONDS = 0.01  # a stat and a small read: every 10 ms is cheap, and each wait here is on every start
LOG_TAIL_LINES = 6


def prepare_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create the working directory {workdir}: {exc.strerror}; choose a workdir you can write"
        raise RequestError("workdir", msg) from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise RequestError("workdir", f"the working directory {workdir} is not writable; choose another one")


def write_connection_file(path: str, key: str, scheme: str) -> None:
    info: dict[str, object] = {"ip": "127.0.0.1", "transport": "tcp", "key": key, "signature_scheme": scheme}
    info.update(dict.fromkeys(PORT_NAMES, 0))  # ipykernel binds free ports itself and rewrites the file
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as conn:
        json.dump(info, conn)


def start_kernel(request: dict, run_dir: RunDir, workdir: str) -> subprocess.Popen:
    argv = [*request["python_argv"], "-m", request["kernel_module"], "-f", run_dir.file(CONNECTION_FILE),
            *request["kernel_arguments"]]
    env = dict(os.environ)
    env.update(read_notebook_env())
    env.update(request["env"])
    kernel_log = os.open(run_dir.file(KERNEL_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(
            argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=kernel_log, stderr=kernel_log,
            start_new_session=True,  # own session and group: signals reach the whole kernel, not the channel
        )
    except OSError as exc:
        msg = f"cannot run {argv[0]!r}: {exc.strerror}; set remote_python to a python3 that exists on the VM"
        raise RequestError("python", msg) from None
    except ValueError as exc:  # a NUL byte in argv or env, or '=' in an env name
        raise RequestError("request", f"bad remote_python or remote_env: {exc}") from None
    finally:
        os.close(kernel_log)


def read_notebook_env() -> dict:
    """The notebook's captured variables, or {} when there are none (or the file is not usable)."""
    try:
        with open(os.path.expanduser(NOTEBOOK_ENV_FILE)) as handle:
            captured = json.load(handle)
    except (OSError, ValueError):
        return {}
    if not isinstance(captured, dict):
        return {}
    return {k: v for k, v in captured.items() if isinstance(k, str) and isinstance(v, str) and "=" not in k}


def read_ports(conn_path: str) -> dict[str, int] | None:
    try:
        with open(conn_path) as conn:
            info = json.load(conn)
    except (OSError, ValueError):  # ipykernel may be rewriting it right now
        return None
    ports = {name: info.get(name) for name in PORT_NAMES}
    return ports if all(isinstance(port, int) and port > 0 for port in ports.values()) else None


def log_tail(path: str) -> str:
    try:
        with open(path, errors="replace") as kernel_log:
            return "".join(kernel_log.readlines()[-LOG_TAIL_LINES:]).strip()
    except OSError:
        return ""


def startup_failure(request: dict, returncode: int, tail: str) -> RequestError:
    python, module = " ".join(request["python_argv"]), request["kernel_module"]
    if "No module named" in tail:
        msg = (f"{python} cannot import {module}: install ipykernel on the VM ({python} -m pip install "
               f"ipykernel) or set remote_python to a python that has it. Kernel log:\n{tail}")
        return RequestError("ipykernel", msg)
    msg = f"the kernel exited with status {returncode} while starting. Kernel log:\n{tail}"
    return RequestError("ipykernel", msg)


def wait_for_ports(request: dict, kernel: subprocess.Popen, run_dir: RunDir) -> dict:
    deadline = time.monotonic() + request["ports_timeout_seconds"]
    while True:
        ports = read_ports(run_dir.file(CONNECTION_FILE))
        if ports:
            return ports
        if kernel.poll() is not None:
            raise startup_failure(request, kernel.returncode, log_tail(run_dir.file(KERNEL_LOG)))
        if time.monotonic() > deadline:
            tail = log_tail(run_dir.file(KERNEL_LOG))
            msg = (f"the kernel did not bind its ports within {request['ports_timeout_seconds']:g} s; raise "
                   f"ports_timeout_seconds if the VM is slow. Kernel log:\n{tail}")
            raise RequestError("ports", msg)
        time.sleep(PORT_POLL_SECONDS)


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def stop_kernel(kernel: subprocess.Popen) -> int:
    """SIGTERM the kernel's group, give it SHUTDOWN_GRACE_SECONDS, then SIGKILL what is left of the group."""
    if kernel.poll() is None:
        signal_group(kernel.pid, signal.SIGTERM)
        try:
            kernel.wait(SHUTDOWN_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("kernel ignored SIGTERM for %g s; killing its group", SHUTDOWN_GRACE_SECONDS)
    signal_group(kernel.pid, signal.SIGKILL)  # also whatever the kernel started and left behind
    return kernel.wait()
