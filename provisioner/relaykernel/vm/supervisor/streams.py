"""The VM end of the resumable streams: kernel connections here, the laptop's transport (whichever is up) there.

The supervisor outlives every SSH link, so the TCP connections to the kernel's ports live here and never see a
cut: ZeroMQ's state (identities, subscriptions, half-sent messages) stays whole, and the laptop's end resumes the
byte streams after it reconnects (``relaykernel.common.mux``).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

from ...common.mux import Mux, ProtocolError
from ...common.reactor import Reactor
from ...common.zmtp import ClientGate
from .rundir import log

READ_BYTES = 256 * 1024
WRITE_CHUNK_BYTES = 256 * 1024
KEEPALIVE_SECONDS = 1.0
CONNECT_SECONDS = 2.0


class Transport:
    """The byte pipe to the laptop now: the launch channel's stdin/stdout, or a bridged control-socket connection."""

    def __init__(self, name: str, read_fd: int, write_fd: int, conn: socket.socket | None = None) -> None:
        self.name, self.read_fd, self.write_fd, self.conn = name, read_fd, write_fd, conn
        self.outbuf = bytearray()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class KernelConnection:
    """One TCP connection to a kernel port, standing for one client connection on the laptop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.outbuf = bytearray()
        self.gate = ClientGate()  # the laptop answered the client's handshake: see common/zmtp.py
        self.held = bytearray()  # the client's bytes after its READY, until the kernel's READY went out


class KernelStreams:
    """Relays mux streams to kernel connections; holds output for the laptop within ``buffer_limit_bytes``."""

    def __init__(self, reactor: Reactor, ports: dict[str, int], *, session: str, buffer_limit_bytes: int,
                 on_activity: Callable[[], None], on_control: Callable[[dict], dict | None]) -> None:
        self.reactor, self.ports, self.session = reactor, ports, session
        self.buffer_limit_bytes = buffer_limit_bytes
        self.on_activity, self.on_control = on_activity, on_control
        self.mux = Mux()
        self.conns: dict[int, KernelConnection] = {}
        self.transport: Transport | None = None
        self._next_keepalive = 0.0

    def attach(self, transport: Transport, *, resume: bool, leftover: bytes = b"") -> None:
        """Carry the streams over ``transport`` from now on; ``resume`` replays what the old one lost."""
        self.drop_transport("replaced")
        self.transport = transport
        if resume:
            self.mux.new_transport()
        log.info("%s: streams attached (%s)", transport.name, "resumed" if resume else "new session")
        if leftover:
            self._feed(leftover)
        self.update()

    def drop_transport(self, why: str) -> None:
        transport, self.transport = self.transport, None
        if transport is None:
            return
        log.info("%s: transport gone (%s); %d bytes held for the laptop", transport.name, why,
                 self.mux.buffered_bytes())
        self.reactor.forget(transport.read_fd)
        self.reactor.forget(transport.write_fd)
        transport.close()

    def send_control(self, event: dict) -> None:
        self.mux.control(event)
        self.update()

    def tick(self, now: float) -> None:
        if now >= self._next_keepalive:
            self._next_keepalive = now + KEEPALIVE_SECONDS
            if self.transport is not None:
                self.mux.flush_acks()
                self.mux.ping(time.monotonic_ns())
                self.update()

    def flush(self, deadline: float) -> None:
        """Write what is queued for the laptop until done or ``deadline`` (the supervisor is about to exit)."""
        while self.transport is not None and (self.transport.outbuf or self.mux.has_output()):
            if time.monotonic() > deadline:
                return
            self.reactor.run_once(max(0.0, min(0.05, deadline - time.monotonic())))

    def close(self) -> None:
        for stream in list(self.conns):
            self._close_conn(stream)
        self.drop_transport("supervisor ending")

    def update(self) -> None:
        """Read and write interest for every descriptor, from the current buffers and limits."""
        room = self.mux.buffered_bytes() < self.buffer_limit_bytes
        for stream, conn in self.conns.items():
            self.reactor.set(conn.sock.fileno(), self._reader(stream) if room else None,
                             self._writer(stream) if conn.outbuf else None)
        transport = self.transport
        if transport is None:
            return
        wants_write = bool(transport.outbuf) or self.mux.has_output()
        if transport.read_fd == transport.write_fd:
            self.reactor.set(transport.read_fd, self._on_transport_readable,
                             self._on_transport_writable if wants_write else None)
        else:
            self.reactor.set(transport.read_fd, self._on_transport_readable)
            self.reactor.set(transport.write_fd, None, self._on_transport_writable if wants_write else None)

    # ---- the laptop's side

    def _on_transport_readable(self) -> None:
        transport = self.transport
        assert transport is not None
        try:
            data = os.read(transport.read_fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.drop_transport(str(exc))
            return
        if not data:
            self.drop_transport("closed by the laptop or the link")
            return
        self.on_activity()
        self._feed(data)
        self.update()

    def _feed(self, data: bytes) -> None:
        try:
            events = self.mux.feed(data)
        except (ProtocolError, ValueError) as exc:
            log.warning("the laptop sent something that is not a frame (%s); dropping that transport", exc)
            self.drop_transport("protocol error")
            return
        for kind, stream, value in events:
            if kind == "open":
                self._open(stream, str(value))
            elif kind == "data":
                self._deliver(stream, value)
            elif kind == "close":
                self._close_conn(stream)
            elif kind == "control":
                reply = self.on_control(value)
                if reply is not None:
                    self.mux.control(reply)
            elif kind == "resumed":
                log.info("resumed: replayed %d bytes to the laptop, %d from it", *value)

    def _on_transport_writable(self) -> None:
        transport = self.transport
        assert transport is not None
        if len(transport.outbuf) < WRITE_CHUNK_BYTES:
            transport.outbuf += self.mux.take(WRITE_CHUNK_BYTES)
        try:
            written = os.write(transport.write_fd, transport.outbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self.drop_transport(str(exc))
            return
        del transport.outbuf[:written]
        self.update()

    # ---- the kernel's side

    def _open(self, stream: int, port_name: str) -> None:
        port = self.ports.get(port_name)
        try:
            if port is None:
                raise OSError(f"no kernel port named {port_name!r}")
            sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_SECONDS)
        except OSError as exc:
            log.info("stream %d: cannot reach the kernel's %s: %s", stream, port_name, exc)
            self.mux.close(stream)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conns[stream] = KernelConnection(sock)

    def _deliver(self, stream: int, data: bytes) -> None:
        conn = self.conns.get(stream)
        if conn is None:
            self.mux.consumed(stream, len(data))  # its connection ended here: let the sender go on
            return
        data, later = conn.gate.from_client(data)
        conn.held += later
        if not data:
            return
        if not conn.outbuf:  # straight to the kernel: only what it does not take now waits (no extra copy)
            try:
                written = conn.sock.send(data)
            except BlockingIOError:
                written = 0
            except OSError:
                self._close_conn(stream)
                self.mux.close(stream)
                return
            self.mux.consumed(stream, written)
            data = data[written:]
            if not data:
                return
        conn.outbuf += data
        self._write_conn(stream, conn)

    def _reader(self, stream: int) -> Callable[[], None]:
        return lambda: self._read_conn(stream)

    def _writer(self, stream: int) -> Callable[[], None]:
        return lambda: self._write_conn(stream, self.conns[stream]) if stream in self.conns else None

    def _read_conn(self, stream: int) -> None:
        conn = self.conns.get(stream)
        if conn is None:
            return
        try:
            data = conn.sock.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.mux.send(stream, data)
            if conn.gate.from_kernel(data) and conn.held:  # the kernel's READY is out: what the client sent next
                conn.outbuf += conn.held
                conn.held.clear()
                self._write_conn(stream, conn)
        else:
            self._close_conn(stream)
            self.mux.close(stream)
        self.update()

    def _write_conn(self, stream: int, conn: KernelConnection) -> None:
        try:
            written = conn.sock.send(conn.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self._close_conn(stream)
            self.mux.close(stream)
            return
        del conn.outbuf[:written]
        self.mux.consumed(stream, written)

    def _close_conn(self, stream: int) -> None:
        conn = self.conns.pop(stream, None)
        if conn is not None:
            self.reactor.forget(conn.sock.fileno())
            conn.sock.close()
