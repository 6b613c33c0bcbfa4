"""The JSON-line control stream to the VM-side supervisor, over one SSH exec channel."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any, Protocol

log = logging.getLogger(__name__)

EOF_EVENT = "_eof"
_FINAL_EVENTS = {"exited", "gone"}


class Channel(Protocol):
    """The part of paramiko.Channel the stream uses."""

    def recv(self, n: int) -> bytes: ...
    def sendall(self, data: bytes) -> None: ...
    def recv_stderr_ready(self) -> bool: ...
    def recv_stderr(self, n: int) -> bytes: ...
    def exit_status_ready(self) -> bool: ...
    def recv_exit_status(self) -> int: ...
    def close(self) -> None: ...


class ControlStream:
    """Sends control lines and hands out the supervisor's event lines; records the kernel's end."""

    def __init__(self, channel: Channel, *, name: str) -> None:
        self._channel = channel
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._send_lock = threading.Lock()
        self.final_event: dict[str, Any] | None = None
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read_events, name=f"relaykernel-control-{name}", daemon=True)
        self._reader.start()

    def send(self, message: dict[str, Any]) -> bool:
        """Send one line; False when the channel is gone."""
        data = (json.dumps(message) + "\n").encode()
        with self._send_lock:
            try:
                self._channel.sendall(data)
            except (OSError, EOFError) as error:
                log.debug("control send failed: %s", error)
                return False
        return True

    def send_raw(self, data: bytes) -> bool:
        """Send bytes as they are (the bootstrap's script)."""
        with self._send_lock:
            try:
                self._channel.sendall(data)
            except (OSError, EOFError):
                return False
        return True

    def request(self, message: dict[str, Any], answers: set[str], timeout_seconds: float) -> dict[str, Any] | None:
        """Send a request and wait for one of ``answers``; a final event or EOF also ends the wait."""
        self.drain()
        if not self.send(message):
            return None
        return self.wait_for(answers, timeout_seconds)

    def wait_for(self, answers: set[str], timeout_seconds: float) -> dict[str, Any] | None:
        """The next event named in ``answers`` (or a final one, or EOF); None on timeout."""
        deadline = time.monotonic() + timeout_seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self._events.get(timeout=left)
            except queue.Empty:
                return None
            if event.get("event") in answers | _FINAL_EVENTS | {EOF_EVENT, "error"}:
                return event
        return None

    def drain(self) -> None:
        """Forget events nobody waited for (answers to requests that timed out)."""
        while True:
            try:
                self._events.get_nowait()
            except queue.Empty:
                return

    def stderr_text(self) -> str:
        """Whatever the remote command wrote to stderr so far (for error messages)."""
        chunks = []
        try:
            while self._channel.recv_stderr_ready():
                chunks.append(self._channel.recv_stderr(65536))
        except (OSError, EOFError):
            pass
        return b"".join(chunks).decode(errors="replace").strip()

    def exit_status(self, timeout_seconds: float = 2.0) -> int | None:
        """The remote command's exit status once the channel has closed."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self._channel.exit_status_ready():
                return self._channel.recv_exit_status()
            time.sleep(0.02)
        return None

    def close(self) -> None:
        """Close the channel and join the reader; safe to call twice."""
        self._channel.close()
        self._reader.join(timeout=2.0)

    def _read_events(self) -> None:
        buffer = b""
        while True:
            try:
                data = self._channel.recv(65536)
            except (OSError, EOFError):
                data = b""
            if not data:
                break
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self._dispatch(line)
        self.closed.set()
        self._events.put({"event": EOF_EVENT})

    def _dispatch(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            log.debug("ignoring a non-JSON line from the supervisor: %r", line[:200])
            return
        if not isinstance(event, dict):
            return
        if event.get("event") in _FINAL_EVENTS and self.final_event is None:
            self.final_event = event
        self._events.put(event)
