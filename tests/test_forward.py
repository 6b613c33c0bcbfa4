"""LocalForwarder and PortForwards against real TCP servers on 127.0.0.1, sockets standing in for channels."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress

import pytest
import zmq

from relaykernel.common.errors import VM, ConfigError, ForwardBindError, LinkDown
from relaykernel.forward import KERNEL_PORT_NAMES, LocalForwarder, PortForwards

Handler = Callable[[socket.socket], None]
MIB = 1024 * 1024


class TcpServer:
    """A TCP server on 127.0.0.1 running `handle` per connection; stop() wakes and joins everything."""

    def __init__(self, handle: Handler) -> None:
        self._handle = handle
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="test-server-accept")
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(connection)
            thread = threading.Thread(target=self._serve, args=(connection,), name="test-server-conn")
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        with connection, suppress(OSError):
            self._handle(connection)

    def stop(self) -> None:
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join()
        for connection in self._connections:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join()


def echo(connection: socket.socket) -> None:
    while data := connection.recv(65536):
        connection.sendall(data)
    connection.shutdown(socket.SHUT_WR)


def banner_then_echo(name: bytes) -> Handler:
    def handle(connection: socket.socket) -> None:
        connection.sendall(name)
        echo(connection)

    return handle


class SocketChannel:
    """A TCP socket shaped like a paramiko Channel (close wakes a blocked recv, as paramiko's does)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def recv(self, n: int) -> bytes:
        return self._sock.recv(n)

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)

    def shutdown_write(self) -> None:
        self._sock.shutdown(socket.SHUT_WR)

    def settimeout(self, t: float | None) -> None:
        self._sock.settimeout(t)

    def close(self) -> None:
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class SocketOpener:
    """open_channel for tests: connects 127.0.0.1:port, or raises LinkDown while `failing`."""

    def __init__(self, receive_buffer_bytes: int | None = None) -> None:
        self.failing = False
        self.opened = 0
        self._receive_buffer_bytes = receive_buffer_bytes

    def __call__(self, port: int) -> SocketChannel:
        if self.failing:
            raise LinkDown(VM, "test-vm", "the SSH link is down", "wait for the reconnect")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self._receive_buffer_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer_bytes)
        sock.connect(("127.0.0.1", port))
        self.opened += 1
        return SocketChannel(sock)


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [thread.name for thread in threading.enumerate() if thread not in before]
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture
def start_server() -> Iterator[Callable[[Handler], TcpServer]]:
    servers: list[TcpServer] = []

    def start(handle: Handler) -> TcpServer:
        servers.append(TcpServer(handle))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def start_forwarder() -> Iterator[Callable[..., LocalForwarder]]:
    forwarders: list[LocalForwarder] = []

    def start(
        remote_port: int, open_channel: Callable[[int], SocketChannel] | None = None, local_port: int = 0
    ) -> LocalForwarder:
        forwarder = LocalForwarder(
            name="test",
            local_port=local_port,
            remote_port=remote_port,
            open_channel=open_channel or SocketOpener(),
        )
        forwarders.append(forwarder)
        forwarder.start()
        return forwarder

    yield start
    for forwarder in forwarders:
        forwarder.stop()


def connect(port: int, receive_buffer_bytes: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    parts = bytearray()
    while len(parts) < size:
        chunk = sock.recv(size - len(parts))
        if not chunk:
            break
        parts += chunk
    return bytes(parts)


def receive_to_eof(sock: socket.socket) -> bytes:
    parts = bytearray()
    while chunk := sock.recv(65536):
        parts += chunk
    return bytes(parts)


def is_closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def exchange(port: int, payload: bytes) -> bytes:
    """Send everything, half-close, and read the echo to EOF."""
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return receive_to_eof(sock)


def forward_threads(name: str = "test") -> list[str]:
    prefix = f"relaykernel-forward-{name}-"
    names = [t.name for t in threading.enumerate() if t.name.startswith(prefix)]
    return [name for name in names if not name.endswith("-accept")]


def wait_until(condition: Callable[[], bool], timeout_seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_echo_with_half_close(start_server, start_forwarder) -> None:
    forwarder = start_forwarder(start_server(echo).port)
    assert exchange(forwarder.local_port, b"hello through the forwarder") == b"hello through the forwarder"


def test_64_mib_both_ways_keep_their_checksum(start_server, start_forwarder) -> None:
    forwarder = start_forwarder(start_server(echo).port)
    payload = os.urandom(64 * MIB)
    received = hashlib.sha256()
    with connect(forwarder.local_port) as sock:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        with ThreadPoolExecutor(max_workers=1) as pool:
            sending = pool.submit(send)
            total = 0
            while chunk := sock.recv(1 << 20):
                received.update(chunk)
                total += len(chunk)
            sending.result()
    assert total == len(payload)
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()


def test_slow_reader_holds_back_the_sender(start_server, start_forwarder) -> None:
    total_bytes, chunk = 32 * MIB, b"x" * 65536
    sent = [0]

    def source(connection: socket.socket) -> None:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        while sent[0] < total_bytes:
            connection.sendall(chunk)
            sent[0] += len(chunk)

    opener = SocketOpener(receive_buffer_bytes=65536)
    forwarder = start_forwarder(start_server(source).port, opener)
    with connect(forwarder.local_port, receive_buffer_bytes=65536) as sock:
        stalled_at = wait_for_stall(lambda: sent[0])
        # Only kernel socket buffers (the accepted socket's send buffer autotunes up to 4 MiB) and one read.
        assert stalled_at < 8 * MIB
        assert len(receive_exactly(sock, total_bytes)) == total_bytes


def wait_for_stall(progress: Callable[[], int]) -> int:
    """The value of `progress` once it has not moved for 0.3 s."""
    last, unchanged_since = -1, time.monotonic()
    deadline = unchanged_since + 10
    while time.monotonic() < deadline:
        value = progress()
        if value != last:
            last, unchanged_since = value, time.monotonic()
        elif time.monotonic() - unchanged_since > 0.3:
            return value
        time.sleep(0.02)
    raise AssertionError(f"the sender never stalled ({last} bytes sent)")


def test_many_concurrent_connections(start_server, start_forwarder) -> None:
    forwarder = start_forwarder(start_server(echo).port)
    sockets = [connect(forwarder.local_port) for _ in range(50)]
    payloads = [os.urandom(100_000) for _ in sockets]

    def talk(sock: socket.socket, payload: bytes) -> bytes:
        with sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return receive_to_eof(sock)

    with ThreadPoolExecutor(max_workers=len(sockets)) as pool:
        echoes = list(pool.map(talk, sockets, payloads))
    assert echoes == payloads


def test_finished_connections_are_forgotten(start_server, start_forwarder) -> None:
    forwarder = start_forwarder(start_server(echo).port)
    for number in range(100):
        assert exchange(forwarder.local_port, b"%d" % number) == b"%d" % number
    assert wait_until(lambda: not forward_threads()), forward_threads()


def test_failed_open_closes_the_client_and_warns_once(start_server, start_forwarder, caplog) -> None:
    opener = SocketOpener()
    opener.failing = True
    forwarder = start_forwarder(start_server(echo).port, opener)
    with caplog.at_level(logging.DEBUG, logger="relaykernel.forward"):
        for _ in range(5):
            with connect(forwarder.local_port) as sock:
                assert is_closed_by_peer(sock)
        opener.failing = False
        assert exchange(forwarder.local_port, b"back") == b"back"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "the SSH link is down" in warnings[0].getMessage()
    assert any("reachable again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_retarget_closes_old_connections_and_reaches_the_new_port(start_server, start_forwarder) -> None:
    first, second = start_server(banner_then_echo(b"A")), start_server(banner_then_echo(b"B"))
    forwarder = start_forwarder(first.port)
    local_port = forwarder.local_port
    with connect(local_port) as old:
        assert old.recv(1) == b"A"
        forwarder.remote_port = second.port
        assert is_closed_by_peer(old)
    assert forwarder.local_port == local_port
    with connect(local_port) as new:
        assert new.recv(1) == b"B"


def test_close_connections_keeps_listening(start_server, start_forwarder) -> None:
    forwarder = start_forwarder(start_server(banner_then_echo(b"A")).port)
    with connect(forwarder.local_port) as old:
        assert old.recv(1) == b"A"
        forwarder.close_connections()
        assert is_closed_by_peer(old)
    assert not forward_threads()
    with connect(forwarder.local_port) as new:
        assert new.recv(1) == b"A"


def test_close_connections_while_clients_keep_connecting(start_server, start_forwarder) -> None:
    """A retarget (close_connections) racing new accepts must neither raise nor leave a thread behind."""
    forwarder = start_forwarder(start_server(echo).port)
    stop = threading.Event()

    def keep_connecting() -> None:
        while not stop.is_set():
            with suppress(OSError), connect(forwarder.local_port):
                pass

    clients = [threading.Thread(target=keep_connecting, name=f"test-client-{n}") for n in range(4)]
    for client in clients:
        client.start()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            forwarder.close_connections()
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert wait_until(lambda: not forward_threads()), "connections whose clients left must end"


def test_a_paused_forwarder_holds_connections_until_retarget(start_server) -> None:
    """A client that connects before the kernel exists keeps its connection and the bytes it already sent."""
    server = start_server(banner_then_echo(b"K"))
    opener = SocketOpener()
    forwarder = LocalForwarder(name="test", local_port=0, remote_port=1, open_channel=opener, start_paused=True)
    forwarder.start()
    try:
        with connect(forwarder.local_port) as early:
            early.sendall(b"sent-before-the-kernel")
            time.sleep(0.3)
            assert opener.opened == 0, "nothing may be opened while paused"
            forwarder.remote_port = server.port
            assert receive_exactly(early, 1 + 22) == b"K" + b"sent-before-the-kernel"
        forwarder.pause()
        held = connect(forwarder.local_port)
        time.sleep(0.2)
        assert opener.opened == 1
        stopped = time.monotonic()
    finally:
        forwarder.stop()
    assert time.monotonic() - stopped < 2.0, "stop() must not wait for held connections' patience"
    assert is_closed_by_peer(held)
    held.close()
    assert not forward_threads()


def test_a_held_connection_gives_up_after_hold_seconds(start_server) -> None:
    forwarder = LocalForwarder(name="test", local_port=0, remote_port=1, open_channel=SocketOpener(),
                               start_paused=True, hold_seconds=0.3)
    forwarder.start()
    try:
        with connect(forwarder.local_port) as held:
            assert is_closed_by_peer(held), "a held connection is closed after hold_seconds, so the client retries"
    finally:
        forwarder.stop()


def test_stop_with_idle_connections_is_prompt_and_clean(start_server) -> None:
    server = start_server(banner_then_echo(b"A"))
    before = set(threading.enumerate())
    forwarder = LocalForwarder(
        name="idle", local_port=0, remote_port=server.port, open_channel=SocketOpener()
    )
    forwarder.start()
    port = forwarder.local_port
    clients = [connect(port) for _ in range(10)]
    try:
        assert all(client.recv(1) == b"A" for client in clients)
        started = time.monotonic()
        forwarder.stop()
        assert time.monotonic() - started < 1.0
        assert forwarder.local_port == port
        forwarder.stop()
        new_threads = [t.name for t in set(threading.enumerate()) - before]
        assert [name for name in new_threads if not name.startswith("test-server")] == []
    finally:
        for client in clients:
            client.close()
    again = LocalForwarder(
        name="again", local_port=port, remote_port=server.port, open_channel=SocketOpener()
    )
    with again:
        assert again.local_port == port


def test_binding_a_taken_port_names_the_address() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        forwarder = LocalForwarder(name="test", local_port=port, remote_port=1, open_channel=SocketOpener())
        with pytest.raises(ForwardBindError, match=f"127.0.0.1:{port}") as raised:
            forwarder.start()
    assert raised.value.fix
    forwarder.stop()


def test_port_zero_reports_the_bound_port(start_server, start_forwarder) -> None:
    forwarder = start_forwarder(start_server(echo).port, local_port=0)
    assert forwarder.local_port != 0
    assert exchange(forwarder.local_port, b"ping") == b"ping"


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match="remote port"):
        LocalForwarder(name="test", local_port=0, remote_port=0, open_channel=SocketOpener())
    with pytest.raises(ConfigError, match="hb_port"):
        PortForwards(local_ports={}, remote_ports={}, open_channel=SocketOpener())


def test_zmq_req_rep_round_trips_through_the_forwarder(start_forwarder) -> None:
    context = zmq.Context()
    reply, request = context.socket(zmq.REP), context.socket(zmq.REQ)
    try:
        for sock in (reply, request):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 5000)
        forwarder = start_forwarder(reply.bind_to_random_port("tcp://127.0.0.1"))
        request.connect(f"tcp://127.0.0.1:{forwarder.local_port}")
        for number in range(100):
            request.send(b"%d" % number)
            reply.send(reply.recv() + b" back")
            assert request.recv() == b"%d back" % number
    finally:
        reply.close()
        request.close()
        context.term()


def test_port_forwards_start_retarget_and_stop(start_server) -> None:
    first = {name: start_server(banner_then_echo(b"1")).port for name in KERNEL_PORT_NAMES}
    second = {name: start_server(banner_then_echo(b"2")).port for name in KERNEL_PORT_NAMES}
    with PortForwards(
        local_ports=dict.fromkeys(KERNEL_PORT_NAMES, 0), remote_ports=first, open_channel=SocketOpener()
    ) as forwards:
        local = forwards.local_ports
        assert sorted(local) == sorted(KERNEL_PORT_NAMES) and len(set(local.values())) == 5
        for port in local.values():
            with connect(port) as sock:
                assert sock.recv(1) == b"1"
        forwards.retarget(second)
        for port in local.values():
            with connect(port) as sock:
                assert sock.recv(1) == b"2"
        forwards.close_connections()


def test_port_forwards_release_every_port_when_one_bind_fails() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        taken_port = taken.getsockname()[1]
        local_ports = dict.fromkeys(KERNEL_PORT_NAMES, 0) | {"hb_port": taken_port}
        forwards = PortForwards(
            local_ports=local_ports,
            remote_ports=dict.fromkeys(KERNEL_PORT_NAMES, 1),
            open_channel=SocketOpener(),
        )
        with pytest.raises(ForwardBindError, match=f"127.0.0.1:{taken_port}"):
            forwards.start()
    assert not [t for t in threading.enumerate() if t.name.startswith("relaykernel-forward-")]
