"""Attach: join a new SSH exec channel (stdin/stdout) to the running supervisor's control socket, both ways."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket

from .protocol import STDIN_FD, STDOUT_FD

BUFFER_BYTES = 1024 * 1024
READ_BYTES = 256 * 1024


class _Direction:
    """Bytes read from one side waiting to be written to the other; reading stops while the buffer is full."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        self.buffer = bytearray()
        self.eof = False

    def pump(self, readable: bool, writable: bool) -> None:
        if readable and len(self.buffer) < BUFFER_BYTES:
            try:
                data = os.read(self.read_fd, READ_BYTES)
            except BlockingIOError:
                data = None
            if data == b"":
                self.eof = True
            elif data:
                self.buffer += data
        if writable and self.buffer:
            with contextlib.suppress(BlockingIOError):
                del self.buffer[:os.write(self.write_fd, self.buffer)]


def bridge(client: socket.socket, leftover: bytes) -> None:
    """Copy until either side ends (or fails); neither direction ever waits for the other."""
    client.setblocking(False)
    for fd in (STDIN_FD, STDOUT_FD):
        os.set_blocking(fd, False)
    up = _Direction(STDIN_FD, client.fileno())
    down = _Direction(client.fileno(), STDOUT_FD)
    up.buffer += leftover
    with selectors.DefaultSelector() as selector:
        while not (up.eof or down.eof):  # one side gone: the other learns it from the closed pipe
            wanted: dict[int, int] = {}
            for direction in (up, down):
                if len(direction.buffer) < BUFFER_BYTES:
                    wanted[direction.read_fd] = wanted.get(direction.read_fd, 0) | selectors.EVENT_READ
                if direction.buffer:
                    wanted[direction.write_fd] = wanted.get(direction.write_fd, 0) | selectors.EVENT_WRITE
            for fd, events in wanted.items():
                selector.register(fd, events)
            ready = {key.fd: mask for key, mask in selector.select()}
            for fd in wanted:
                selector.unregister(fd)
            for direction in (up, down):
                direction.pump(bool(ready.get(direction.read_fd, 0) & selectors.EVENT_READ),
                               bool(ready.get(direction.write_fd, 0) & selectors.EVENT_WRITE))
