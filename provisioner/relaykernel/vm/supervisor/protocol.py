"""The supervisor's requests and events: JSON lines, their fields, defaults and checks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time

from ...common.protocol import RUN_ROOT

KERNEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MODULE_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
ERROR_REASONS = ("workdir", "ipykernel", "python", "ports", "request")
END_REASONS = ("kernel", "shutdown", "lease", "terminated", "failed")
LAUNCH_DEFAULTS = {
    "signature_scheme": "hmac-sha256",
    "kernel_module": "ipykernel_launcher",
    "kernel_arguments": [],
    "workdir": "~",
    "run_root": RUN_ROOT,
    "env": {},
    "ports_timeout_seconds": 30.0,
}
LAUNCH_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "key": str,
    "signature_scheme": str,
    "python_argv": list,
    "kernel_module": str,
    "kernel_arguments": list,
    "workdir": str,
    "lease_seconds": (int, float),
    "run_root": str,
    "env": dict,
    "ports_timeout_seconds": (int, float),
}
MAX_LINE_BYTES = 65536
STDIN_FD, STDOUT_FD = 0, 1
EXIT_OK, EXIT_LAUNCH_FAILED, EXIT_GONE = 0, 2, 3


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
        data = data[os.write(fd, data):]


def encode_event(event: dict) -> bytes:
    return (json.dumps(event) + "\n").encode()


def emit(event: dict) -> None:
    """Write one event line to the exec channel (stdout) outside the loop; a channel already gone is no error."""
    with contextlib.suppress(OSError):
        write_all(STDOUT_FD, encode_event(event))


def error_event(reason: str, message: str) -> dict:
    return {"event": "error", "reason": reason, "message": message}


def drain_buffered_stdin() -> tuple[bytes, bool]:
    """What the bootstrap's buffered reader read ahead (the loop reads fd 0 raw), and whether stdin has ended.

    Never blocks. An ended stdin before the kernel starts means the laptop already gave up (a cancelled start):
    then nothing is launched.
    """
    was_blocking = os.get_blocking(STDIN_FD)
    os.set_blocking(STDIN_FD, False)
    try:
        data = sys.stdin.buffer.read() or b""
        try:
            ended = os.read(STDIN_FD, 1 << 16)
        except BlockingIOError:
            return data, False
        return data + ended, not ended
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
        (not all(isinstance(w, str) for w in request["kernel_arguments"]), "kernel_arguments must be strings"),
        (not all(isinstance(v, str) for v in request["env"].values()), "env values must be strings"),
        (not MODULE_PATTERN.match(request["kernel_module"]), "kernel_module must be a dotted module name"),
        (request["lease_seconds"] <= 0 or request["ports_timeout_seconds"] <= 0, "timeouts must be positive"),
    ]
    for failed, message in problems:
        if failed:
            raise RequestError("request", message)
