"""VM-side supervisor: runs one ipykernel under a lease and serves its control streams (stdlib, py>=3.8).

This file is sent to the VM as a script, never imported there. The laptop runs ``python3 -c BOOTSTRAP`` over
an SSH exec channel and writes ``<decimal length>\\n<script bytes>`` to stdin; the bootstrap holds no secret.
After the script, both directions speak lines of UTF-8 JSON, one object per line (stdout flushed per line).

First line, the request, one of:
  {"mode": "launch", "kernel_id": ID, "key": HMAC key, "signature_scheme": "hmac-sha256",
   "python_argv": ["python3"], "kernel_module": "ipykernel_launcher", "workdir": "~", "lease_seconds": 30.0,
   "run_root": "~/.relaykernel/run", "env": {}, "ports_timeout_seconds": 30.0}
  {"mode": "attach", "kernel_id": ID, "run_root": "~/.relaykernel/run"}
ID matches KERNEL_ID_PATTERN; key, kernel_id, python_argv and lease_seconds are required for launch (the rest
default as in LAUNCH_DEFAULTS). Paths expand "~" on the VM; workdir is created with its parents if missing.

The kernel's environment is the session's, then NOTEBOOK_ENV_FILE's variables when that file exists (what the
heartbeat cell captured from the notebook: PATH, LD_LIBRARY_PATH, CUDA_* …, so the kernel sees the GPU as the
notebook does), then the request's env.

Launch answers {"event": "started", "pid", "pgid", "ports": {<PORT_NAMES>: int}, "run_dir", "workdir"} or
{"event": "error", "reason": one of ERROR_REASONS, "message"} and exits EXIT_LAUNCH_FAILED. The kernel runs in
its own session with ports bound on 127.0.0.1; its files live in <run_root>/<kernel_id> (mode 0700).

Control lines, on stdin or on any connection to <run dir>/control.sock (attach bridges to that socket):
  {"op": "renew"}               -> {"event": "renewed", "lease_left_seconds"}
  {"op": "signal", "signum": n} -> {"event": "signalled", "signum"}   (sent to the kernel's process group)
  {"op": "status"}              -> {"event": "status", "alive", "pid", "ports", "lease_left_seconds",
                                    "lease_seconds"}
  {"op": "peek"}                -> the same status, and the only line that does NOT renew the lease (for
                                   onlookers such as the heartbeat cell, which must not keep orphans alive)
  {"op": "shutdown"}            -> SIGTERM, SHUTDOWN_GRACE_SECONDS, SIGKILL, then "exited" (below)
  anything else                 -> {"event": "error", "reason": "request", "message"}; the supervisor goes on
Every other line renews the lease. When the kernel stops (by itself, on shutdown, at lease expiry or on SIGTERM to
the supervisor) every stream gets {"event": "exited", "status": returncode, "why": one of END_REASONS}, the
run dir is removed, <run_root>/<kernel_id>.ended keeps one line saying why, and the supervisor exits EXIT_OK.
Stdin EOF is not an end: the kernel lives on under the lease. Attach with nothing there answers
{"event": "gone", "message"} and exits EXIT_GONE.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time

BOOTSTRAP = (
    "import sys;b=sys.stdin.buffer;n=int(b.readline());"
    "exec(compile(b.read(n),'relaykernel-supervisor','exec'))"
)

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
KERNEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MODULE_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
ERROR_REASONS = ("workdir", "ipykernel", "python", "ports", "request")
END_REASONS = ("kernel", "shutdown", "lease", "terminated", "failed")
LAUNCH_DEFAULTS = {
    "signature_scheme": "hmac-sha256",
    "kernel_module": "ipykernel_launcher",
    "workdir": "~",
    "run_root": "~/.relaykernel/run",
    "env": {},
    "ports_timeout_seconds": 30.0,
}
LAUNCH_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "key": str,
    "signature_scheme": str,
    "python_argv": list,
    "kernel_module": str,
    "workdir": str,
    "lease_seconds": (int, float),
    "run_root": str,
    "env": dict,
    "ports_timeout_seconds": (int, float),
}
CONNECTION_FILE = "kernel.json"
CONTROL_SOCKET = "control.sock"
KERNEL_LOG = "kernel.log"
SUPERVISOR_LOG = "supervisor.log"
ENDED_SUFFIX = ".ended"
NOTEBOOK_ENV_FILE = "~/.relaykernel/notebook-env.json"  # written by relaykernel.vm.notebook_env
ENDED_MAX_AGE_SECONDS = 86400.0
SHUTDOWN_GRACE_SECONDS = 3.0
PORT_POLL_SECONDS = 0.05
MAX_WAIT_SECONDS = 1.0
MAX_LINE_BYTES = 65536
LOG_TAIL_LINES = 6
STDIN_FD, STDOUT_FD = 0, 1
EXIT_OK, EXIT_LAUNCH_FAILED, EXIT_GONE = 0, 2, 3

log = logging.getLogger("relaykernel.supervisor")


class RequestError(Exception):
    """A launch or attach that cannot go ahead; ``reason`` is one of ERROR_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def encode_event(event: dict) -> bytes:
    return (json.dumps(event) + "\n").encode()


def emit(event: dict) -> None:
    """Write one event to the exec channel (stdout) outside the loop; a channel already gone is no error."""
    with contextlib.suppress(OSError):
        write_all(STDOUT_FD, encode_event(event))


def error_event(reason: str, message: str) -> dict:
    return {"event": "error", "reason": reason, "message": message}


def drain_buffered_stdin() -> bytes:
    """Return what the bootstrap's buffered reader read ahead, without blocking: the loop reads fd 0 raw."""
    was_blocking = os.get_blocking(STDIN_FD)
    os.set_blocking(STDIN_FD, False)
    try:
        return sys.stdin.buffer.read() or b""
    finally:
        os.set_blocking(STDIN_FD, was_blocking)


def parse_request(line: bytes) -> dict:
    try:
        request = json.loads(line)
    except ValueError:
        raise RequestError("request", "the first line after the script must be one JSON object") from None
    if not isinstance(request, dict) or request.get("mode") not in ("launch", "attach"):
        raise RequestError("request", 'the request needs "mode": "launch" or "attach"')
    kernel_id = request.get("kernel_id")
    if not isinstance(kernel_id, str) or not KERNEL_ID_PATTERN.match(kernel_id):
        msg = f"kernel_id {kernel_id!r}: use 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        raise RequestError("request", msg)
    merged = dict(LAUNCH_DEFAULTS, **request)
    if merged["mode"] == "launch":
        check_launch_fields(merged)
    return merged


def check_launch_fields(request: dict) -> None:
    for name, kind in LAUNCH_FIELD_TYPES.items():
        if not isinstance(request.get(name), kind) or isinstance(request.get(name), bool):
            raise RequestError("request", f"launch request field {name!r} is missing or has the wrong type")
    problems = [
        (not request["key"], "key must not be empty"),
        (not all(isinstance(w, str) for w in request["python_argv"]) or not request["python_argv"],
         "python_argv must be a non-empty list of strings"),
        (not all(isinstance(v, str) for v in request["env"].values()), "env values must be strings"),
        (not MODULE_PATTERN.match(request["kernel_module"]), "kernel_module must be a dotted module name"),
        (request["lease_seconds"] <= 0 or request["ports_timeout_seconds"] <= 0, "timeouts must be positive"),
    ]
    for failed, message in problems:
        if failed:
            raise RequestError("request", message)


class RunDir:
    """The kernel's private directory <run_root>/<kernel_id>, and the .ended note that outlives it."""

    def __init__(self, run_root: str, kernel_id: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(run_root))
        self.kernel_id = kernel_id
        self.path = os.path.join(self.root, kernel_id)
        self.ended_path = self.path + ENDED_SUFFIX

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def connect(self) -> socket.socket:
        """Connect to the live supervisor's control socket; OSError when there is none."""
        os.chdir(self.path)  # a relative address dodges the 108-byte limit on unix socket paths
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(CONTROL_SOCKET)
        except OSError:
            client.close()
            raise
        return client

    def has_live_supervisor(self) -> bool:
        try:
            self.connect().close()
        except OSError:
            return False
        return True

    def create(self) -> None:
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            shutil.rmtree(self.path, ignore_errors=True)  # left by a supervisor that was SIGKILLed
            os.mkdir(self.path, 0o700)
            os.chmod(self.path, 0o700)
        except OSError as exc:
            msg = f"cannot create the run dir {self.path}: {exc.strerror}; set run_root to a writable place"
            raise RequestError("request", msg) from None
        self.forget_old_endings()

    def forget_old_endings(self) -> None:
        cutoff = time.time() - ENDED_MAX_AGE_SECONDS
        for entry in os.scandir(self.root):
            try:
                if entry.name.endswith(ENDED_SUFFIX) and (
                    entry.path == self.ended_path or entry.stat().st_mtime < cutoff
                ):
                    os.unlink(entry.path)
            except OSError:  # another supervisor removed it first
                pass

    def record_ending(self, summary: str) -> None:
        try:
            with open(self.ended_path, "w") as note:
                note.write(summary + "\n")
        except OSError:
            log.exception("cannot write %s", self.ended_path)

    def ending(self) -> str:
        try:
            with open(self.ended_path) as note:
                return "gone: " + note.read().strip()
        except OSError:
            return f"gone: no supervisor for kernel {self.kernel_id} under {self.root}"

    def remove(self) -> None:
        for name in (CONNECTION_FILE, CONTROL_SOCKET):  # the connection file holds the key: make sure it goes
            with contextlib.suppress(OSError):
                os.unlink(self.file(name))
        shutil.rmtree(self.path, ignore_errors=True)


def start_logging(run_dir: RunDir) -> None:
    handler = logging.FileHandler(run_dir.file(SUPERVISOR_LOG))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def stop_logging() -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


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
    argv = request["python_argv"] + ["-m", request["kernel_module"], "-f", run_dir.file(CONNECTION_FILE)]
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
        raise RequestError("request", f"bad python_argv or env: {exc}") from None
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


def install_signal_wakeup() -> int:
    """Route SIGCHLD, SIGTERM and SIGHUP to a pipe the loop selects on; return its read end."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        # A Python handler (not SIG_IGN) so the wakeup byte is written, and exec resets it for the kernel.
        signal.signal(signum, lambda *_: None)
    return read_fd


class ControlStream:
    """One line-protocol peer: the exec channel (stdin/stdout) or one control-socket connection."""

    def __init__(self, name: str, read_fd: int, write_fd: int, conn: socket.socket | None = None) -> None:
        self.name, self.read_fd, self.write_fd, self.conn = name, read_fd, write_fd, conn
        self.pending = b""
        self.writable = True

    def feed(self, data: bytes) -> list[bytes]:
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        if len(self.pending) > MAX_LINE_BYTES:
            self.pending = b""
            lines.append(b"<line too long>")
        return [line for line in lines if line.strip()]

    def send(self, event: dict) -> None:
        if not self.writable:
            return
        try:
            write_all(self.write_fd, encode_event(event))
        except OSError as exc:  # EPIPE: the channel is gone; EAGAIN: a socket peer stopped reading
            log.info("%s: stopped writing (%s)", self.name, exc)
            self.writable = False

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class KernelSupervisor:
    """The single selectors loop: control streams, the control socket, signals, the kernel and the lease."""

    def __init__(self, request: dict, kernel: subprocess.Popen, ports: dict, run_dir: RunDir) -> None:
        self.kernel, self.ports, self.run_dir = kernel, ports, run_dir
        self.lease_seconds = float(request["lease_seconds"])
        self.lease_deadline = time.monotonic() + self.lease_seconds
        self.selector = selectors.DefaultSelector()
        self.streams: list[ControlStream] = []
        self.end_reason: str | None = None
        self.ops = {"renew": self.op_renew, "signal": self.op_signal, "status": self.op_status,
                    "peek": self.op_status, "shutdown": self.op_shutdown}

    def lease_left(self) -> float:
        return round(max(0.0, self.lease_deadline - time.monotonic()), 3)

    def broadcast(self, event: dict) -> None:
        for stream in self.streams:
            stream.send(event)

    def open_stream(self, stream: ControlStream, leftover: bytes = b"") -> None:
        self.streams.append(stream)
        self.selector.register(stream.read_fd, selectors.EVENT_READ, lambda: self.on_readable(stream))
        for line in stream.feed(leftover):
            self.handle_line(stream, line)

    def close_stream(self, stream: ControlStream) -> None:
        self.selector.unregister(stream.read_fd)
        if stream.conn is not None:
            self.streams.remove(stream)
            stream.close()
        log.info("%s: closed by the peer; the kernel stays up under the lease", stream.name)

    def on_readable(self, stream: ControlStream) -> None:
        try:
            data = os.read(stream.read_fd, MAX_LINE_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close_stream(stream)
        for line in stream.feed(data):
            self.handle_line(stream, line)

    def on_connection(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.setblocking(False)  # a peer that stops reading must not stall the loop
        self.open_stream(ControlStream(f"socket#{conn.fileno()}", conn.fileno(), conn.fileno(), conn))

    def on_signal(self, wakeup_fd: int) -> None:
        for signum in os.read(wakeup_fd, 512):
            if signum == signal.SIGTERM:
                log.info("received SIGTERM; stopping the kernel")
                self.end_reason = self.end_reason or "terminated"
            elif signum == signal.SIGHUP:
                log.info("ignored SIGHUP")

    def handle_line(self, stream: ControlStream, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not (isinstance(message, dict) and message.get("op") == "peek"):
            self.lease_deadline = time.monotonic() + self.lease_seconds
        handler = self.ops.get(str(message.get("op"))) if isinstance(message, dict) else None
        if handler is None:
            ops = ", ".join(sorted(self.ops))
            text = line[:200].decode(errors="replace")
            stream.send(error_event("request", f"not a known control line: {text}; ops are {ops}"))
            return
        handler(stream, message)

    def op_renew(self, stream: ControlStream, message: dict) -> None:
        stream.send({"event": "renewed", "lease_left_seconds": self.lease_left()})

    def op_signal(self, stream: ControlStream, message: dict) -> None:
        signum = message.get("signum")
        if not isinstance(signum, int) or signum not in signal.valid_signals():
            stream.send(error_event("request", f"signum {signum!r} is not a signal number"))
            return
        log.info("%s: sending signal %d to the kernel's group", stream.name, signum)
        signal_group(self.kernel.pid, signum)
        stream.send({"event": "signalled", "signum": signum})

    def op_status(self, stream: ControlStream, message: dict) -> None:
        alive = self.kernel.poll() is None
        stream.send({"event": "status", "alive": alive, "pid": self.kernel.pid, "ports": self.ports,
                     "lease_left_seconds": self.lease_left(), "lease_seconds": self.lease_seconds})

    def op_shutdown(self, stream: ControlStream, message: dict) -> None:
        log.info("%s: shutdown requested", stream.name)
        self.end_reason = self.end_reason or "shutdown"

    def check_kernel_and_lease(self) -> None:
        if self.end_reason is None and self.kernel.poll() is not None:
            log.info("kernel exited by itself with status %s", self.kernel.returncode)
            self.end_reason = "kernel"
        if self.end_reason is None and time.monotonic() >= self.lease_deadline:
            log.info("lease expired: no control line for %g s", self.lease_seconds)
            self.end_reason = "lease"

    def loop(self) -> None:
        while self.end_reason is None:
            wait = min(MAX_WAIT_SECONDS, max(0.0, self.lease_deadline - time.monotonic()))
            for key, _ in self.selector.select(wait):
                key.data()
            self.check_kernel_and_lease()

    def run(self, wakeup_fd: int, listener: socket.socket, leftover: bytes) -> int:
        self.selector.register(wakeup_fd, selectors.EVENT_READ, lambda: self.on_signal(wakeup_fd))
        self.selector.register(listener, selectors.EVENT_READ, lambda: self.on_connection(listener))
        try:
            self.open_stream(ControlStream("channel", STDIN_FD, STDOUT_FD), leftover)
            self.loop()
        except Exception:
            log.exception("supervisor loop failed; stopping the kernel")
            raise
        finally:
            self.finish(listener)
        return EXIT_OK

    def finish(self, listener: socket.socket) -> None:
        why = self.end_reason or "failed"
        status = stop_kernel(self.kernel)
        self.broadcast({"event": "exited", "status": status, "why": why})
        self.run_dir.record_ending(ending_summary(why, status, self.lease_seconds))
        log.info("ended (%s); kernel status %s", why, status)
        for stream in self.streams:
            stream.close()
        listener.close()
        self.selector.close()
        stop_logging()
        self.run_dir.remove()


def ending_summary(why: str, status: int, lease_seconds: float) -> str:
    at = utc_now()
    texts = {
        "kernel": f"kernel exited with status {status} at {at}",
        "shutdown": f"kernel shut down on request at {at} (status {status})",
        "lease": f"lease expired at {at} (no control line for {lease_seconds:g} s); kernel status {status}",
        "terminated": f"supervisor got SIGTERM at {at}; kernel status {status}",
        "failed": f"supervisor failed at {at}; kernel status {status}",
    }
    return texts[why]


def listen_for_control(run_dir: RunDir) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.chdir(run_dir.path)  # a relative address dodges the 108-byte limit on unix socket paths
        listener.bind(CONTROL_SOCKET)
        listener.listen(8)
    except OSError as exc:
        listener.close()
        raise RequestError("request", f"cannot listen on {run_dir.file(CONTROL_SOCKET)}: {exc}") from None
    return listener


def start_supervised_kernel(
    request: dict, run_dir: RunDir, workdir: str
) -> tuple[subprocess.Popen, dict[str, int], socket.socket]:
    prepare_workdir(workdir)
    run_dir.create()
    start_logging(run_dir)
    write_connection_file(run_dir.file(CONNECTION_FILE), request["key"], request["signature_scheme"])
    kernel = start_kernel(request, run_dir, workdir)
    try:
        ports = wait_for_ports(request, kernel, run_dir)
        listener = listen_for_control(run_dir)
    except RequestError:
        stop_kernel(kernel)
        raise
    log.info("kernel pid %d started in %s with ports %s", kernel.pid, workdir, ports)
    return kernel, ports, listener


def launch(request: dict, leftover: bytes) -> int:
    run_dir = RunDir(request["run_root"], request["kernel_id"])
    workdir = os.path.abspath(os.path.expanduser(request["workdir"]))  # before anything changes the cwd
    if run_dir.has_live_supervisor():
        msg = f"kernel {run_dir.kernel_id} is already supervised in {run_dir.path}; attach or pick another id"
        emit(error_event("request", msg))
        return EXIT_LAUNCH_FAILED
    wakeup_fd = install_signal_wakeup()
    try:
        kernel, ports, listener = start_supervised_kernel(request, run_dir, workdir)
    except RequestError as exc:
        run_dir.record_ending(f"launch failed ({exc.reason}) at {utc_now()}")
        stop_logging()
        run_dir.remove()
        emit(error_event(exc.reason, exc.message))
        return EXIT_LAUNCH_FAILED
    supervisor = KernelSupervisor(request, kernel, ports, run_dir)
    # start_new_session made the kernel its own group leader: its pgid is its pid.
    started = {"event": "started", "pid": kernel.pid, "pgid": kernel.pid, "ports": ports,
               "run_dir": run_dir.path, "workdir": workdir}
    emit(started)
    return supervisor.run(wakeup_fd, listener, leftover)


def bridge(client: socket.socket, leftover: bytes) -> None:
    """Copy this channel's stdin to the control socket and the socket to stdout until either side ends."""
    client.sendall(leftover)
    with selectors.DefaultSelector() as selector:
        selector.register(STDIN_FD, selectors.EVENT_READ)
        selector.register(client, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj == STDIN_FD:
                    data = os.read(STDIN_FD, MAX_LINE_BYTES)
                    client.sendall(data)
                else:
                    data = client.recv(MAX_LINE_BYTES)
                    write_all(STDOUT_FD, data)
                if not data:
                    return


def attach(request: dict, leftover: bytes) -> int:
    run_dir = RunDir(request["run_root"], request["kernel_id"])
    try:
        client = run_dir.connect()
    except OSError:
        emit({"event": "gone", "message": run_dir.ending()})
        return EXIT_GONE
    # Either side going away mid-copy ends the bridge, not the supervisor.
    with client, contextlib.suppress(OSError):
        bridge(client, leftover)
    return EXIT_OK


def main() -> int:
    # sshd does not signal exec children when the client goes; a vanished channel shows up as EPIPE instead.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    line = sys.stdin.buffer.readline(MAX_LINE_BYTES)
    leftover = drain_buffered_stdin()
    try:
        request = parse_request(line)
    except RequestError as exc:
        emit(error_event(exc.reason, exc.message))
        return EXIT_LAUNCH_FAILED
    if request["mode"] == "attach":
        return attach(request, leftover)
    return launch(request, leftover)


if __name__ == "__main__":
    sys.exit(main())
