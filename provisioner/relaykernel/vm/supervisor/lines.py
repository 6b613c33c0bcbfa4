"""One JSON-line control peer of the supervisor: the exec channel (stdin/stdout) or a control-socket connection."""

from __future__ import annotations

import socket

from .protocol import MAX_LINE_BYTES, encode_event, write_all
from .rundir import log


class LinePeer:
    """Reads request lines and writes event lines; a peer that stops reading is dropped, never waited for."""

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
