"""Listeners on 127.0.0.1 that relay each accepted connection over an SSH channel to a remote port."""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from types import TracebackType
from typing import Protocol

from .common.errors import LOCAL, ConfigError, ForwardBindError, KernelNotRunning

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
KERNEL_PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
_LISTEN_BACKLOG = 128
_ACCEPT_RETRY_SECONDS = 0.1
_GATE_POLL_SECONDS = 0.1


class ChannelLike(Protocol):
    """What a paramiko.Channel offers and the forwarder uses; close() must wake a thread blocked in recv()."""

    def recv(self, n: int) -> bytes: ...

    def sendall(self, data: bytes) -> None: ...

    def shutdown_write(self) -> None: ...

    def close(self) -> None: ...

    def settimeout(self, t: float | None) -> None: ...


OpenChannel = Callable[[int], ChannelLike]
"""Given the remote port, open a channel to it (may raise RelayKernelError, e.g. LinkDown, ForwardRefused)."""


def _check_port(what: str, port: int, minimum: int) -> int:
    if not minimum <= port <= 65535:
        msg = f"{what} = {port!r} is not a TCP port: use {minimum}..65535"
        raise ConfigError(msg)
    return port


def _shutdown(sock: socket.socket, how: int) -> None:
    with suppress(OSError):  # already shut down, closed or reset: nothing left to wake
        sock.shutdown(how)


class _OutageLog:
    """Warns once when channels stop opening and once more when they open again, not per attempt.

    A kernel that is simply not running (restarting, shutting down) is no outage: that is logged at debug level.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._failing = False

    def failed(self, remote_port: int, error: Exception) -> None:
        with self._lock:
            first, self._failing = not self._failing, True
        level = logging.WARNING if first and not isinstance(error, KernelNotRunning) else logging.DEBUG
        log.log(level, "%s: cannot reach remote port %d (%s); closing the local connection so the client "
                "retries", self._name, remote_port, error)

    def opened(self, remote_port: int) -> None:
        with self._lock:
            recovered, self._failing = self._failing, False
        if recovered:
            log.info("%s: remote port %d reachable again", self._name, remote_port)

    def reset(self) -> None:
        with self._lock:
            self._failing = False


class _Connection:
    """One accepted socket and its channel, relayed by two threads; the 'up' thread owns the pair."""

    def __init__(self, client: socket.socket, label: str, *, connect: Callable[[_Connection], ChannelLike | None],
                 read_size_bytes: int, on_finished: Callable[[_Connection], None]) -> None:
        self._client = client
        self._label = label
        self._connect = connect
        self._read_size_bytes = read_size_bytes
        self._on_finished = on_finished
        self._lock = threading.Lock()
        self._channel: ChannelLike | None = None
        self._aborted = False
        self.past_gate = False  # set once it stopped waiting for a kernel and picked the remote port to open
        self.owner = threading.Thread(target=self._run, name=f"{label}-up", daemon=True)

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        """Wake both threads: they see EOF or an error and the owner closes everything."""
        with self._lock:
            self._aborted = True
            channel = self._channel
        _shutdown(self._client, socket.SHUT_RDWR)
        if channel is not None:
            channel.close()

    def _run(self) -> None:
        channel = None
        try:
            channel = self._claim(self._connect(self))
            if channel is not None:
                self._relay(channel)
        finally:
            if channel is not None:
                channel.close()
            self._client.close()
            self._on_finished(self)

    def _claim(self, channel: ChannelLike | None) -> ChannelLike | None:
        """Keep the new channel unless abort() came while it was opening."""
        if channel is not None:
            channel.settimeout(None)  # blocking reads: an idle port must not time out; set before abort() sees it
        with self._lock:
            if not self._aborted:
                self._channel = channel
                return channel
        if channel is not None:
            channel.close()
        return None

    def _relay(self, channel: ChannelLike) -> None:
        down = threading.Thread(target=self._pump, name=f"{self._label}-down", daemon=True,
                                args=(channel.recv, self._client.sendall,
                                      lambda: self._client.shutdown(socket.SHUT_WR)))
        down.start()
        self._pump(self._client.recv, channel.sendall, channel.shutdown_write)
        down.join()

    def _pump(self, read: Callable[[int], bytes], write: Callable[[bytes], None],
              end_write: Callable[[], None]) -> None:
        """Copy until EOF, then half-close the other side; a blocking write is the back-pressure."""
        try:
            while chunk := read(self._read_size_bytes):
                write(chunk)
            end_write()
        except Exception as error:  # socket and channel errors differ by implementation; all end the pair
            log.debug("%s: connection ended: %s", self._label, error)
            self.abort()


class LocalForwarder:
    """One listening port on 127.0.0.1 relayed to one remote port."""

    def __init__(self, *, name: str, local_port: int, remote_port: int, open_channel: OpenChannel,
                 read_size_bytes: int = 65536, start_paused: bool = False, hold_seconds: float = 60.0) -> None:
        if not name:
            raise ConfigError("a forwarder needs a name (e.g. 'shell_port') for its threads and messages")
        if read_size_bytes < 1:
            raise ConfigError(f"read_size_bytes = {read_size_bytes!r} is too small: use 1 or more")
        self.name = name
        self._requested_port = _check_port(f"{name} local port", local_port, 0)
        self._remote_port = _check_port(f"{name} remote port", remote_port, 1)
        self._open_channel = open_channel
        self._read_size_bytes = read_size_bytes
        self._outage = _OutageLog(f"forward {name}")
        self._lock = threading.Lock()
        self._active: set[_Connection] = set()
        self._finished: list[_Connection] = []
        self._numbers = itertools.count(1)
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._bound_port = 0
        self._acceptor: threading.Thread | None = None
        self._hold_seconds = hold_seconds
        self._gate = threading.Event()  # open: connect at once; closed: hold new connections until retarget
        if not start_paused:
            self._gate.set()

    @property
    def local_port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._bound_port or self._requested_port

    @property
    def remote_port(self) -> int:
        return self._remote_port

    @remote_port.setter
    def remote_port(self, port: int) -> None:
        """Point connections at another remote port: those held by pause() go there, the old kernel's are closed."""
        self._gate.clear()
        self._remote_port = _check_port(f"{self.name} remote port", port, 1)
        self._outage.reset()
        self.close_connections(past_gate_only=True)
        self._gate.set()

    def pause(self) -> None:
        """Hold new connections (up to hold_seconds) instead of opening channels, until the next retarget.

        A client that connects while no kernel is there (before it starts, during a restart) then keeps its
        connection, and the bytes it already sent, instead of being closed and reconnecting: a ZMQ SUB socket
        re-sends its subscription after a reconnect only when its application next touches it, so iopub
        messages published meanwhile would be lost.
        """
        self._gate.clear()

    def start(self) -> None:
        """Bind 127.0.0.1:local_port (0 picks a free port) and accept in a background thread."""
        if self._listener is not None or self._stopping.is_set():
            raise RuntimeError(f"forwarder {self.name} was already started")
        self._listener = self._bind()
        self._bound_port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"relaykernel-forward-{self.name}-accept")
        self._acceptor.start()

    def close_connections(self, *, past_gate_only: bool = False) -> None:
        """Drop current connections (all, or those not held at the gate) and keep listening.

        A channel still opening is waited for (open_channel has its own timeout), then closed.
        """
        with self._lock:
            connections = [c for c in self._active if c.past_gate or not past_gate_only]
        for connection in connections:
            connection.abort()
        self._join(connections)
        self._reap_finished()

    def stop(self) -> None:
        """Close the listener and every connection and join every thread; safe to call twice."""
        self._stopping.set()
        listener = self._listener
        if listener is not None:
            _shutdown(listener, socket.SHUT_RDWR)  # close() alone does not wake accept()
            listener.close()
        if self._acceptor is not None:
            self._acceptor.join()
        self.close_connections()

    def __enter__(self) -> LocalForwarder:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def _bind(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((LOOPBACK, self._requested_port))
            listener.listen(_LISTEN_BACKLOG)
        except OSError as error:
            listener.close()
            address = f"{LOOPBACK}:{self._requested_port}"
            raise ForwardBindError(
                LOCAL, f"listener {self.name} on {address}", f"cannot listen on {address}: {error.strerror}",
                f"another program holds the port (see `ss -ltnp 'sport = :{self._requested_port}'`): "
                "stop it, or choose another local port (0 picks a free one)") from error
        return listener

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError as error:
                if not self._stopping.is_set():
                    log.warning("forward %s: accept failed (%s); retrying", self.name, error)
                    self._stopping.wait(_ACCEPT_RETRY_SECONDS)
                continue
            self._serve(client)
            self._reap_finished()

    def _serve(self, client: socket.socket) -> None:
        if self._stopping.is_set():
            client.close()
            return
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        label = f"relaykernel-forward-{self.name}-{next(self._numbers)}"
        connection = _Connection(client, label, connect=self._connect, read_size_bytes=self._read_size_bytes,
                                 on_finished=self._forget)
        with self._lock:  # started under the lock: close_connections() never sees an unstarted thread to join
            self._active.add(connection)
            connection.owner.start()

    def _connect(self, connection: _Connection) -> ChannelLike | None:
        """A channel to the remote port, or None (logged once per outage) so the client retries."""
        if not self._through_gate(connection):
            return None
        connection.past_gate = True
        remote_port = self._remote_port
        try:
            channel = self._open_channel(remote_port)
        except Exception as error:  # any failure only means this connection cannot be served now
            self._outage.failed(remote_port, error)
            return None
        self._outage.opened(remote_port)
        return channel

    def _through_gate(self, connection: _Connection) -> bool:
        """Wait while paused; False if stopped, aborted or held too long (the client then reconnects)."""
        deadline = time.monotonic() + self._hold_seconds
        while not self._gate.wait(_GATE_POLL_SECONDS):
            if self._stopping.is_set() or connection.aborted or time.monotonic() > deadline:
                return False
        return not self._stopping.is_set()

    def _forget(self, connection: _Connection) -> None:
        """Called by a connection's owner thread as its last step."""
        with self._lock:
            self._active.discard(connection)
            self._finished.append(connection)

    def _reap_finished(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
        self._join(finished)

    @staticmethod
    def _join(connections: list[_Connection]) -> None:
        current = threading.current_thread()
        for connection in connections:
            if connection.owner is not current:
                connection.owner.join()


class PortForwards:
    """The five kernel ports as one unit."""

    def __init__(self, *, local_ports: Mapping[str, int], remote_ports: Mapping[str, int],
                 open_channel: OpenChannel, start_paused: bool = False, hold_seconds: float = 60.0) -> None:
        _check_port_names("local_ports", local_ports)
        _check_port_names("remote_ports", remote_ports)
        self._forwarders = [
            LocalForwarder(name=name, local_port=local_ports[name], remote_port=remote_ports[name],
                           open_channel=open_channel, start_paused=start_paused, hold_seconds=hold_seconds)
            for name in KERNEL_PORT_NAMES
        ]

    @property
    def local_ports(self) -> dict[str, int]:
        return {forwarder.name: forwarder.local_port for forwarder in self._forwarders}

    def start(self) -> dict[str, int]:
        """Bind all five; if one fails, stop the ones already listening and re-raise."""
        started: list[LocalForwarder] = []
        try:
            for forwarder in self._forwarders:
                forwarder.start()
                started.append(forwarder)
        except BaseException:
            for forwarder in reversed(started):
                forwarder.stop()
            raise
        return self.local_ports

    def pause(self) -> None:
        """Hold new connections on every port until the next retarget (see LocalForwarder.pause)."""
        for forwarder in self._forwarders:
            forwarder.pause()

    def retarget(self, remote_ports: Mapping[str, int]) -> None:
        """Point every listener at the kernel's new remote ports (restart or re-attach) without rebinding."""
        _check_port_names("remote_ports", remote_ports)
        for forwarder in self._forwarders:
            forwarder.remote_port = remote_ports[forwarder.name]

    def close_connections(self) -> None:
        for forwarder in self._forwarders:
            forwarder.close_connections()

    def stop(self) -> None:
        for forwarder in reversed(self._forwarders):
            forwarder.stop()

    def __enter__(self) -> PortForwards:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def _check_port_names(what: str, ports: Mapping[str, int]) -> None:
    missing = [name for name in KERNEL_PORT_NAMES if name not in ports]
    if missing:
        msg = f"{what} lacks {', '.join(missing)}: give all of {', '.join(KERNEL_PORT_NAMES)}"
        raise ConfigError(msg)
