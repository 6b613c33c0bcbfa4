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

    def feed(self, data: bytes) -> None:
        self.pending += data

    def next_line(self) -> bytes | None:
        """The next complete non-blank line, or None; what follows it stays in ``pending`` byte for byte (after a
        line asking for the streams, frames may already be there)."""
        while True:
            newline = self.pending.find(b"\n")
            if newline < 0:
                if len(self.pending) > MAX_LINE_BYTES:
                    self.pending = b""
                    return b"<line too long>"
                return None
            line, self.pending = self.pending[:newline], self.pending[newline + 1:]
            if line.strip():
                return line

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
