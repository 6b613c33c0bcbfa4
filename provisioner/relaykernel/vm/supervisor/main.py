"""Entry point of the VM-side supervisor (stdlib, py>=3.8): launch a kernel, or attach to a running one.

The laptop runs ``python3 -c BOOTSTRAP`` over an SSH exec channel and writes ``<decimal length>\\n<program>``
(this package, bundled) to stdin; the bootstrap holds no secret. Then both directions speak lines of UTF-8 JSON,
one object per line, until one side asks for the streams.

First line, the request, one of:
  {"mode": "launch", "kernel_id": ID, "key": HMAC key, "signature_scheme": "hmac-sha256",
   "python_argv": ["python3"], "kernel_module": "ipykernel_launcher", "kernel_arguments": [],
   "workdir": "~", "lease_seconds": 30.0, "run_root": "~/.relaykernel/run", "env": {},
   "ports_timeout_seconds": 30.0}
  {"mode": "attach", "kernel_id": ID, "run_root": "~/.relaykernel/run"}
key, kernel_id, python_argv and lease_seconds are required for launch (the rest default as in LAUNCH_DEFAULTS).
kernel_arguments are appended to the kernel's argv (never through a shell). Paths expand "~" on the VM.

Launch answers {"event": "started", "pid", "pgid", "ports", "run_dir", "workdir", "protocol", "cell"} (cell: what
the VM's cell recorded, ~/.relaykernel/cell.json, or null) or
{"event": "error", "reason", "message"} and exits EXIT_LAUNCH_FAILED. The kernel runs in its own session with
ports bound on 127.0.0.1; its files live in <run_root>/<kernel_id> (mode 0700).

Control lines, on stdin or on any connection to <run dir>/control.sock (attach bridges to that socket):
  {"op": "renew"}               -> {"event": "renewed", "lease_left_seconds"}
  {"op": "signal", "signum": n} -> {"event": "signalled", "signum"}   (sent to the kernel's process group)
  {"op": "status"}              -> {"event": "status", "alive", "pid", "ports", "lease_left_seconds", ...}
  {"op": "peek"}                -> the same status, and the only line that does NOT renew the lease
  {"op": "shutdown"}            -> SIGTERM, a grace, SIGKILL, then "exited" (below)
  {"op": "mux", "session": S, "resume": bool, "buffer_limit_bytes": n}
                                -> {"event": "mux", "resumed": bool, "protocol"}; from the next byte on, this
                                   channel carries the resumable streams (relaykernel.common.mux): one per client
                                   connection to a kernel port, plus the control lines above as CONTROL frames.
                                   The same session S again (after a cut) with resume true replays what was lost.
Every other line and every frame renews the lease. When the kernel stops, every peer gets
{"event": "exited", "status", "why"}, the run dir is removed, <run_root>/<kernel_id>.ended keeps one line saying
why, and the supervisor exits EXIT_OK. Channel EOF is not an end: the kernel lives on under the lease. Attach with
nothing there answers {"event": "gone", "message"} and exits EXIT_GONE.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

from ...common.protocol import CONTROL_SOCKET, PROTOCOL_VERSION
from ...common.version import read_cell_info
from .bridge import bridge
from .kernel import prepare_workdir, start_kernel, stop_kernel, wait_for_ports, write_connection_file
from .lines import LinePeer
from .loop import KernelSupervisor
from .protocol import (
    EXIT_GONE,
    EXIT_LAUNCH_FAILED,
    EXIT_OK,
    MAX_LINE_BYTES,
    STDIN_FD,
    STDOUT_FD,
    RequestError,
    drain_buffered_stdin,
    emit,
    error_event,
    parse_request,
    utc_now,
)
from .rundir import CONNECTION_FILE, RunDir, log, start_logging, stop_logging


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


def listen_for_control(run_dir: RunDir) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.chdir(run_dir.path)  # a relative address dodges the 108-byte limit on unix socket paths
        listener.bind(CONTROL_SOCKET)
        listener.listen(8)
    except OSError as exc:
        listener.close()
        raise RequestError("request", f"cannot listen on {run_dir.file(CONTROL_SOCKET)}: {exc}") from None
    listener.setblocking(False)
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
    emit({"event": "started", "pid": kernel.pid, "pgid": kernel.pid, "ports": ports, "run_dir": run_dir.path,
          "workdir": workdir, "protocol": PROTOCOL_VERSION, "cell": read_cell_info()})
    return supervisor.run(wakeup_fd, listener, LinePeer("channel", STDIN_FD, STDOUT_FD), leftover)


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
    if not line:  # a spare started ahead of a restart that never came: its channel closed, nothing to do
        return EXIT_OK
    leftover, ended = drain_buffered_stdin()
    try:
        request = parse_request(line)
    except RequestError as exc:
        emit(error_event(exc.reason, exc.message))
        return EXIT_LAUNCH_FAILED
    if request["mode"] == "attach":
        return attach(request, leftover)
    if ended:  # the laptop closed the channel before we got here: nobody would ever reach this kernel
        return EXIT_LAUNCH_FAILED
    return launch(request, leftover)


if __name__ == "__main__":
    sys.exit(main())
