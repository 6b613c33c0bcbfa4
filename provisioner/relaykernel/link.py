"""The laptop end of the resumable streams: five listeners on 127.0.0.1, their clients, and the link to the VM.

Each client connection to a local kernel port is one stream of ``relaykernel.common.mux``, carried over one SSH
channel to the VM's supervisor, which holds the matching connection to the kernel. When the link drops nothing
is closed on either side: the keeper brings up a new channel, ``attach`` resumes the streams, and the client's
ZeroMQ sockets never notice. Only the kernel's end (its exit, a restart) closes client connections.

Two threads: a selectors loop (listeners, clients, reading the channel, keepalive and silence) and a writer that
sends to the channel, whose sends block on the SSH window (and on a hung link) without stalling the loop.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .common.errors import LOCAL, ConfigError, ForwardBindError
from .common.mux import Mux, ProtocolError
from .common.protocol import PORT_NAMES
from .common.reactor import Reactor
from .common.zmtp import HandshakeError, KernelHandshakeFilter, kernel_handshake
from .pacing import WindowSizer

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
READ_BYTES = 256 * 1024
WRITE_CHUNK_BYTES = 256 * 1024
SIZING_MIN_SECONDS = 0.1  # the window is sized every round trip, at most this often
SIZING_MIN_RTT_SECONDS = 0.02  # below this the first window (2 MiB) is never what limits the rate
_LISTEN_BACKLOG = 128
FINAL_EVENTS = {"exited", "gone"}  # the kernel ended, or its session did: they answer any waiting request


class Transport(Protocol):
    """What a paramiko Channel offers and the link uses."""

    def recv(self, n: int) -> bytes: ...
    def sendall(self, data: bytes) -> None: ...
    def settimeout(self, t: float | None) -> None: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


class _Client:
    """One accepted local connection: its stream once a kernel is there, and what waits to be written to it."""

    def __init__(self, sock: socket.socket, port_name: str) -> None:
        self.sock = sock
        self.port_name = port_name
        self.stream: int | None = None
        self.outbuf = bytearray()
        self.unstreamed = 0  # leading outbuf bytes that came from here, not from the stream (no credit for them)
        self.handshake: KernelHandshakeFilter | None = None  # drops the kernel's ZMTP handshake (zmtp.py)


class _Waiter:
    def __init__(self, answers: set[str], on_answer: Callable[[dict[str, Any] | None], None] | None = None,
                 deadline: float = float("inf")) -> None:
        self.answers = answers | FINAL_EVENTS | {"error"}
        self.event: dict[str, Any] | None = None
        self.done = threading.Event()
        self.on_answer, self.deadline = on_answer, deadline  # post(): told later, nobody waits

    def answer(self, event: dict[str, Any] | None) -> None:
        self.event = event
        self.done.set()
        if self.on_answer is not None:
            self.on_answer(event)


class StreamLink:
    """Listeners, client streams and the current transport; ``attach`` after every (re)connect."""

    def __init__(self, *, local_ports: Mapping[str, int], buffer_limit_bytes: int, keepalive_seconds: float,
                 silence_seconds: float, on_down: Callable[[str], None] = lambda why: None,
                 on_final: Callable[[dict[str, Any]], None] = lambda event: None,
                 resize_window: Callable[[Any, int], None] | None = None, answer_handshakes: bool = True) -> None:
        missing = [name for name in PORT_NAMES if name not in local_ports]
        if missing:
            raise ConfigError(f"local_ports lacks {', '.join(missing)}: give all of {', '.join(PORT_NAMES)}")
        self._requested = dict(local_ports)
        self.local_ports: dict[str, int] = {}
        self.buffer_limit_bytes = buffer_limit_bytes
        self.keepalive_seconds = keepalive_seconds
        self.silence_seconds = silence_seconds
        self.on_down, self.on_final = on_down, on_final
        self.accepted: dict[str, int] = dict.fromkeys(PORT_NAMES, 0)  # by port: clients never need to reconnect
        self.rtt_seconds: float | None = None
        self.window = WindowSizer()
        # common/zmtp.py: greet clients as the kernel would; off for good once a kernel answers unlike Jupyter's
        self.answer_handshakes = answer_handshakes
        self._resize_window = resize_window  # None: the transport's window is left as it was opened
        self._lock = threading.RLock()
        self._wake_writer = threading.Condition(self._lock)
        self._reactor = Reactor()
        self._listeners: list[socket.socket] = []
        self._clients: dict[int, _Client] = {}  # by socket fd
        self._streams: dict[int, _Client] = {}  # by stream id
        self._ids = itertools.count(1)
        self._mux: Mux | None = None
        self._transport: Transport | None = None
        self._transport_fd = -1
        self._reading = False
        self._inbox = bytearray()
        self._last_heard = 0.0
        self._next_keepalive = 0.0
        self._next_sizing = 0.0
        self._waiters: list[_Waiter] = []
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._loop = threading.Thread(target=self._guarded, args=(self._run_loop,), name="relaykernel-link",
                                      daemon=True)
        self._writer = threading.Thread(target=self._guarded, args=(self._run_writer,),
                                        name="relaykernel-link-send", daemon=True)

    # ---- lifecycle

    def start(self) -> dict[str, int]:
        """Bind the five listeners (refusing nothing: clients wait for a kernel) and start the threads."""
        try:
            for name in PORT_NAMES:
                listener = _bind(name, self._requested[name])
                self._listeners.append(listener)
                self.local_ports[name] = listener.getsockname()[1]
                self._reactor.set(listener.fileno(), self._acceptor(listener, name))
        except BaseException:  # nothing started: leave nothing open either (stop() stays safe to call)
            self._close_listeners()
            self._reactor.close()
            self._wake_r.close()
            self._wake_w.close()
            raise
        self._wake_r.setblocking(False)
        self._reactor.set(self._wake_r.fileno(), self._drain_wakeups)
        self._loop.start()
        self._writer.start()
        return dict(self.local_ports)

    def begin_session(self, transport: Transport, leftover: bytes = b"", *, reading: bool = True) -> None:
        """A new kernel's streams over ``transport``: connections made before it now reach it.

        ``reading=False`` sends at once but leaves the channel to its owner until ``start_reading``: a launch sends
        the waiting clients' first bytes right behind its request, while it still reads the launch's answer lines.
        """
        with self._lock:
            self._end_streams()
            self._mux = Mux()
            self._set_transport(transport, leftover, reading=reading)
            for client in self._clients.values():
                self._open_stream(client)
        self._wake()

    def start_reading(self, leftover: bytes = b"") -> None:
        """The owner is done with the channel's first lines; ``leftover`` is what it read past them."""
        with self._lock:
            if self._transport is None or self._reading:
                return
            self._reading = True
            self._transport.settimeout(None)  # the owner's line reads set a timeout: sends must wait, not fail
            self._last_heard = time.monotonic()
            self._reactor.set(self._transport_fd, self._on_transport_readable)
            if leftover:
                self._handle(leftover)
        self._wake()

    def resume(self, transport: Transport, leftover: bytes = b"") -> int:
        """The same kernel over a new transport: replay what the last one lost. Bytes held for the VM."""
        with self._lock:
            if self._mux is None:
                raise ConfigError("resume() needs a session: call begin_session() first")
            self._mux.new_transport()
            self._set_transport(transport, leftover)
            held = self._mux.buffered_bytes()
        self._wake()
        return held

    def end_session(self) -> None:
        """The kernel is gone (exit, restart): close its client connections; new ones wait for the next kernel."""
        with self._lock:
            self._end_streams()
            self._mux = None
            self._drop_transport()
            self._fail_waiters({"event": "gone", "message": "the kernel's session ended"})
        self._wake()

    def stop(self) -> None:
        """Close everything and join both threads; safe to call twice."""
        self._stopping.set()
        self._wake()
        for thread in (self._loop, self._writer):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join()
        with self._lock:
            self._end_streams()
            self._drop_transport()
            for client in list(self._clients.values()):
                self._close_client(client)
            self._fail_waiters({"event": "gone", "message": "stopped"})
        self._close_listeners()
        self._reactor.close()
        self._wake_r.close()
        self._wake_w.close()

    # ---- control requests over the streams' channel

    def request(self, message: dict[str, Any], answers: set[str], timeout_seconds: float) -> dict[str, Any] | None:
        """Send a control line to the supervisor; its answer (or a final event), None on timeout or no session."""
        waiter = _Waiter(answers)
        with self._lock:
            if self._mux is None:
                return None
            self._waiters.append(waiter)
            self._mux.control(message)
            self._wake_writer.notify()
        waiter.done.wait(timeout_seconds)
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return waiter.event

    def post(self, message: dict[str, Any], answers: set[str], timeout_seconds: float,
             on_answer: Callable[[dict[str, Any] | None], None]) -> bool:
        """Send a control line without waiting for its answer: ``on_answer`` gets it (or a final event) on the link's
        thread, or None after ``timeout_seconds``. False when there is no session to send it on. A line sent while
        the link is down goes after the reconnect, ahead of any stream byte queued after it."""
        with self._lock:
            if self._mux is None:
                return False
            self._waiters.append(_Waiter(answers, on_answer, time.monotonic() + timeout_seconds))
            self._mux.control(message)
            self._wake_writer.notify()
        return True

    def buffered_bytes(self) -> int:
        with self._lock:
            return 0 if self._mux is None else self._mux.buffered_bytes()

    # ---- the loop thread

    def _guarded(self, body: Callable[[], None]) -> None:
        """The threads' one top-level guard: an unexpected error is logged once and ends the link plainly."""
        try:
            body()
        except Exception:
            log.exception("relaykernel's stream link failed unexpectedly; the kernel's connections are closed")
            with self._lock:
                self._end_streams()
                self._mux = None
                self._drop_transport()
            self.on_final({"event": "exited", "status": -1, "why": "failed", "message": "the laptop's link failed"})

    def _run_loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                self._update_interest()
            self._reactor.run_once(0.2)
            self._tick(time.monotonic())

    def _tick(self, now: float) -> None:
        with self._lock:
            self._expire_waiters(now)
            mux, silent = self._mux, now - self._last_heard
            if mux is None or self._transport is None or not self._reading:
                return
            if silent <= self.silence_seconds:
                sizing_interval = max(SIZING_MIN_SECONDS, self.window.base_rtt or self.keepalive_seconds)
                if now >= self._next_keepalive:
                    self._next_keepalive, self._next_sizing = now + self.keepalive_seconds, now + sizing_interval
                    mux.flush_acks()
                    mux.ping(time.monotonic_ns())
                    self._wake_writer.notify()
                    self._size_window(may_shrink=True)
                elif now >= self._next_sizing:
                    # Growing is judged every round trip, so a long fat path opens up within a few; shrinking only
                    # once per keepalive, as a busy CPU delays single pongs too. A short path never needs more than
                    # the first window: it is left alone.
                    self._next_sizing = now + sizing_interval
                    if self.window.receiving and (self.window.base_rtt or 0) >= SIZING_MIN_RTT_SECONDS:
                        mux.ping(time.monotonic_ns())
                        self._wake_writer.notify()
                        self._size_window(may_shrink=False)
                return
            self._drop_transport()
        self.on_down(f"nothing heard from the VM for {silent:.1f} s")

    def _update_interest(self) -> None:
        room = self._mux is not None and self._mux.buffered_bytes() < self.buffer_limit_bytes
        for fd, client in self._clients.items():
            readable = room and client.stream is not None
            self._reactor.set(fd, self._client_reader(client) if readable else None,
                              self._client_writer(client) if client.outbuf else None)

    def _acceptor(self, listener: socket.socket, name: str) -> Callable[[], None]:
        def accept() -> None:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = _Client(sock, name)
            with self._lock:
                self.accepted[name] += 1
                self._clients[sock.fileno()] = client
                if self.answer_handshakes:
                    self._answer_handshake(client)
                if self._mux is not None:
                    self._open_stream(client)
        return accept

    def _answer_handshake(self, client: _Client) -> None:
        """Greet the new client as the kernel's socket would (zmtp.py): its first message leaves at once."""
        greeting = kernel_handshake(client.port_name)
        try:
            written = client.sock.send(greeting)
        except OSError:
            written = 0  # the reader finds out what happened to the socket
        client.outbuf += greeting[written:]
        client.unstreamed = len(greeting) - written
        client.handshake = KernelHandshakeFilter()

    def _from_kernel(self, client: _Client, stream: int, data: bytes) -> bytes | None:
        """The stream's bytes minus the kernel's own handshake (credited at once); None: the client was closed."""
        assert self._mux is not None and client.handshake is not None
        try:
            data, dropped = client.handshake.feed(data)
        except HandshakeError as error:
            log.warning("%s: %s; closing that connection, its client reconnects without the handshake shortcut",
                        client.port_name, error)
            self.answer_handshakes = False
            self._mux.close(stream)
            self._close_client(client)
            return None
        if dropped:
            self._mux.consumed(stream, dropped)
        if client.handshake.done:
            client.handshake = None
        return data

    def _client_reader(self, client: _Client) -> Callable[[], None]:
        def read() -> None:
            try:
                data = client.sock.recv(READ_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            with self._lock:
                if data and self._mux is not None and client.stream is not None:
                    self._mux.send(client.stream, data)
                    self._wake_writer.notify()
                elif not data:
                    if self._mux is not None and client.stream is not None:
                        self._mux.close(client.stream)
                        self._wake_writer.notify()
                    self._close_client(client)
        return read

    def _client_writer(self, client: _Client) -> Callable[[], None]:
        def write() -> None:
            with self._lock:
                self._write_client(client)
        return write

    def _send_client(self, client: _Client, data: bytes) -> None:
        """Straight to the client's socket; only what it does not take now waits in its buffer (no extra copy)."""
        try:
            written = client.sock.send(data)
        except BlockingIOError:
            written = 0
        except OSError:
            if self._mux is not None and client.stream is not None:
                self._mux.close(client.stream)
            self._close_client(client)
            return
        if written < len(data):
            client.outbuf += memoryview(data)[written:]
        if self._mux is not None and client.stream is not None:
            self._mux.consumed(client.stream, written)

    def _write_client(self, client: _Client) -> None:
        try:
            written = client.sock.send(client.outbuf)
        except BlockingIOError:
            return
        except OSError:
            if self._mux is not None and client.stream is not None:
                self._mux.close(client.stream)
            self._close_client(client)
            return
        del client.outbuf[:written]
        local = min(written, client.unstreamed)
        client.unstreamed -= local
        if self._mux is not None and client.stream is not None and written > local:
            self._mux.consumed(client.stream, written - local)

    def _on_transport_readable(self) -> None:
        with self._lock:
            transport = self._transport
            if transport is None or not _has_input(transport):
                return
            try:
                data = transport.recv(READ_BYTES)
            except (OSError, EOFError):
                data = b""
            if data:
                self._last_heard = time.monotonic()
                self.window.observe_bytes(len(data))
                self._handle(data)
                self._wake_writer.notify()
                return
            self._drop_transport()
        self.on_down("the SSH channel closed")

    def _handle(self, data: bytes) -> None:
        assert self._mux is not None
        try:
            events = self._mux.feed(data)
        except (ProtocolError, ValueError) as error:
            log.warning("the VM's supervisor sent something that is not a frame (%s); reconnecting", error)
            self._drop_transport()
            return
        for kind, stream, value in events:
            client = self._streams.get(stream)
            if kind == "data":
                if client is not None and client.handshake is not None:
                    value = self._from_kernel(client, stream, value)
                    if not value:
                        continue
                if client is None:
                    self._mux.consumed(stream, len(value))
                elif client.outbuf:
                    client.outbuf += value
                    self._write_client(client)
                else:
                    self._send_client(client, value)
            elif kind == "close" and client is not None:
                self._close_client(client)
            elif kind == "control":
                self._on_control(value)
            elif kind == "resumed":
                to_vm, from_vm = value
                log.warning("the streams resumed: replayed %d bytes (%d to the VM, %d from it)", to_vm + from_vm,
                            to_vm, from_vm)
            elif kind == "pong":
                self.rtt_seconds = (time.monotonic_ns() - int(value)) / 1e9
                self.window.observe_rtt(self.rtt_seconds)

    def _on_control(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        for waiter in list(self._waiters):
            if name in waiter.answers:
                self._waiters.remove(waiter)
                waiter.answer(event)
                break
        if name in FINAL_EVENTS:
            self.on_final(event)

    def _size_window(self, *, may_shrink: bool) -> None:
        before, after = self.window.window, self.window.update(may_shrink=may_shrink)
        if after != before and self._resize_window is not None and self._transport is not None:
            log.debug("receive window %d -> %d bytes (round trip %.1f ms)", before, after,
                      (self.rtt_seconds or 0) * 1e3)
            self._resize_window(self._transport, after)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    # ---- the writer thread

    def _run_writer(self) -> None:
        while True:
            with self._lock:
                while not self._stopping.is_set() and not self._has_output():
                    self._wake_writer.wait(0.5)
                if self._stopping.is_set():
                    return
                transport, mux = self._transport, self._mux
                assert transport is not None and mux is not None
                chunk = mux.take(WRITE_CHUNK_BYTES)
            if not chunk:
                continue
            try:
                transport.sendall(chunk)
            except (OSError, EOFError) as error:
                with self._lock:
                    if self._transport is not transport:
                        continue
                    self._drop_transport()
                self.on_down(f"sending to the VM failed: {error}")

    def _has_output(self) -> bool:
        return self._transport is not None and self._mux is not None and self._mux.has_output()

    # ---- helpers (called with the lock held)

    def _set_transport(self, transport: Transport, leftover: bytes, *, reading: bool = True) -> None:
        self._drop_transport()
        transport.settimeout(None)  # the writer's sends wait for the SSH window; reads happen only when data is there
        self._transport = transport
        self._transport_fd = transport.fileno()
        self._last_heard = time.monotonic()
        self._reading = reading
        if reading:
            self._reactor.set(self._transport_fd, self._on_transport_readable)
        if self._resize_window is not None:
            self._resize_window(transport, self.window.window)
        if leftover:
            self._handle(leftover)

    def _drop_transport(self) -> None:
        """Stop using the transport. Never close it here: on a hung link that blocks; its owner closes the SSH hop."""
        if self._transport is not None:
            self._reactor.forget(self._transport_fd)
        self._transport, self._transport_fd, self._reading = None, -1, False

    def _open_stream(self, client: _Client) -> None:
        assert self._mux is not None
        client.stream = next(self._ids)
        self._streams[client.stream] = client
        self._mux.open(client.stream, client.port_name)
        self._wake_writer.notify()

    def _end_streams(self) -> None:
        for client in list(self._streams.values()):
            self._close_client(client)

    def _close_client(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd >= 0:
            self._reactor.forget(fd)
            self._clients.pop(fd, None)
        if client.stream is not None:
            self._streams.pop(client.stream, None)
        client.sock.close()

    def _fail_waiters(self, event: dict[str, Any]) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.answer(event)

    def _expire_waiters(self, now: float) -> None:
        for waiter in [w for w in self._waiters if w.deadline <= now]:
            self._waiters.remove(waiter)
            waiter.answer(None)

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        with self._lock:
            self._wake_writer.notify()


def _has_input(transport: Any) -> bool:
    """True when a recv() returns at once: data is buffered, or the channel ended (a plain socket: the selector said
    so). paramiko's readiness pipe can be set a moment longer than its buffer holds data."""
    ready = getattr(transport, "recv_ready", None)
    return ready is None or ready() or bool(transport.closed) or bool(transport.eof_received)


def _bind(name: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} local port = {port!r} is not a TCP port: use 0..65535")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((LOOPBACK, port))
        listener.listen(_LISTEN_BACKLOG)
    except OSError as error:
        listener.close()
        address = f"{LOOPBACK}:{port}"
        raise ForwardBindError(
            LOCAL, f"listener {name} on {address}", f"cannot listen on {address}: {error.strerror}",
            f"another program holds the port (see `ss -ltnp 'sport = :{port}'`): "
            "stop it, or choose another local port (0 picks a free one)") from error
    listener.setblocking(False)
    return listener
