"""The link emulator does what benchmarks rely on: the set delay and rate, a blackhole that holds bytes, a reset."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from linkemu import LinkEmulator

DELAY_MS = 20.0
RATE_MBIT = 20.0
BULK_BYTES = 2_500_000  # one second at 20 Mbit/s
TIMEOUT = 10.0
ATTEMPTS = 5  # a loaded machine may wake the emulator late in one run; it can do better


class Handler(socketserver.BaseRequestHandler):
    """First line picks the game: ``echo`` (echo until EOF), ``sink`` (count until EOF, reply with the arrival
    times), ``source N`` (send N bytes), ``banner`` (server speaks first, then echo)."""

    request: socket.socket

    def handle(self) -> None:
        self.request.settimeout(TIMEOUT)
        if self._greet():
            return
        command = self._line().split()
        if command[0] == "source":
            self.request.sendall(b"x" * int(command[1]))
        elif command[0] == "sink":
            self._sink()
        else:
            self._echo()

    def _greet(self) -> bool:
        if self.server.banner_first:  # type: ignore[attr-defined]
            self.request.sendall(b"hello\n")
            self._echo()
            return True
        return False

    def _line(self) -> str:
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.request.recv(1)
            if not chunk:
                break
            data += chunk
        return data.decode()

    def _echo(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)

    def _sink(self) -> None:
        count, first, first_size, last = 0, 0.0, 0, 0.0
        while data := self.request.recv(65536):
            last = time.monotonic()
            if not first:
                first, first_size = last, len(data)
            count += len(data)
        report = {"count": count, "first": first, "first_size": first_size, "last": last}
        self.request.sendall(json.dumps(report).encode())


@contextlib.contextmanager
def serving(banner_first: bool) -> Iterator[socketserver.ThreadingTCPServer]:
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    srv.banner_first = banner_first  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, name="test-server")
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(TIMEOUT)


@pytest.fixture(params=[False, True], ids=["client-first", "banner-first"])
def server(request: pytest.FixtureRequest) -> Iterator[socketserver.ThreadingTCPServer]:
    with serving(request.param) as srv:
        yield srv


@pytest.fixture
def plain_server() -> Iterator[socketserver.ThreadingTCPServer]:
    with serving(False) as srv:
        yield srv


def connect(link: LinkEmulator) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", link.port), timeout=TIMEOUT)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def echo_round_trip(conn: socket.socket) -> float:
    started = time.monotonic()
    conn.sendall(b"p")
    assert conn.recv(1) == b"p"
    return time.monotonic() - started


def receive_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, f"connection closed after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


PRECISION = [pytest.param(False, id="bounds"), pytest.param(True, id="precise", marks=pytest.mark.slow)]


@pytest.mark.parametrize("precise", PRECISION)
def test_echo_round_trip_is_twice_the_delay(server: socketserver.ThreadingTCPServer, precise: bool) -> None:
    """Never shorter than twice the delay; within 3 ms of it (best of a few runs) on a machine that is not busy."""
    medians, slack = [], 0.003 if precise else 0.05
    with LinkEmulator(server.server_address[1], delay_ms=DELAY_MS) as link:
        for _ in range(ATTEMPTS):
            with connect(link) as conn:
                if server.banner_first:  # type: ignore[attr-defined]
                    # the upstream is reached one round trip after accept; its banner takes one delay to come back
                    started = time.monotonic()
                    assert receive_exactly(conn, 6) == b"hello\n"
                    assert time.monotonic() - started >= 3 * DELAY_MS / 1000
                else:
                    conn.sendall(b"echo\n")
                times = [echo_round_trip(conn) for _ in range(25)]
            assert min(times) >= 2 * DELAY_MS / 1000, "faster than the speed of light"
            medians.append(statistics.median(times))
            if medians[-1] <= 2 * DELAY_MS / 1000 + slack:
                break
    assert min(medians) == pytest.approx(2 * DELAY_MS / 1000, abs=slack), medians


def rate_up(link: LinkEmulator) -> float:
    """Mbit/s at the far end, from the second chunk that arrived to the last."""
    with connect(link) as conn:
        conn.sendall(b"sink\n" + b"y" * BULK_BYTES)
        conn.shutdown(socket.SHUT_WR)
        report = json.loads(conn.makefile("rb").read())
    return float((report["count"] - report["first_size"]) * 8 / (report["last"] - report["first"]) / 1e6)


def rate_down(link: LinkEmulator) -> float:
    with connect(link) as conn:
        conn.sendall(f"source {BULK_BYTES}\n".encode())
        first = len(conn.recv(65536))
        started = time.monotonic()
        receive_exactly(conn, BULK_BYTES - first)
        return (BULK_BYTES - first) * 8 / (time.monotonic() - started) / 1e6


@pytest.mark.parametrize("precise", PRECISION)
@pytest.mark.parametrize("measure", [rate_up, rate_down], ids=["up", "down"])
def test_bulk_runs_at_the_set_rate(plain_server: socketserver.ThreadingTCPServer, measure: Any, precise: bool) -> None:
    """Never faster than the set rate; within 1% of it (best of a few runs) on a machine that is not busy."""
    port = plain_server.server_address[1]
    rates, slack = [], 0.01 if precise else 0.5
    with LinkEmulator(port, delay_ms=5, up_mbit=RATE_MBIT, down_mbit=RATE_MBIT) as link:
        for _ in range(ATTEMPTS):
            rates.append(measure(link))
            assert rates[-1] <= RATE_MBIT * 1.01, f"faster than the set rate: {rates}"
            if rates[-1] >= RATE_MBIT * (1 - slack):
                break
    assert max(rates) == pytest.approx(RATE_MBIT, rel=slack), rates


def test_a_blackhole_holds_every_byte_in_order_and_bounds_what_it_holds(
    plain_server: socketserver.ThreadingTCPServer,
) -> None:
    port = plain_server.server_address[1]
    with LinkEmulator(port, delay_ms=2, queue_kib=64) as link, connect(link) as conn:
        conn.sendall(b"echo\n")
        echo_round_trip(conn)
        link.blackhole(True)
        payload = bytes(range(256)) * 4096  # 1 MiB: more than the link and the sockets hold together
        sender = threading.Thread(target=conn.sendall, args=(payload,), name="test-sender")
        sender.start()
        time.sleep(0.5)
        stats = link.stats()
        conn.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.recv(1)
        link.blackhole(False)
        conn.settimeout(TIMEOUT)
        echoed = receive_exactly(conn, len(payload))
        sender.join(TIMEOUT)
    assert stats["blackholed"] and stats["open"] == 1
    assert 0 < stats["held_bytes"] <= 2 * 64 * 1024
    assert echoed == payload


def test_a_reset_closes_every_connection_and_new_ones_still_work(
    plain_server: socketserver.ThreadingTCPServer,
) -> None:
    with LinkEmulator(plain_server.server_address[1]) as link:
        first, second = connect(link), connect(link)
        for conn in (first, second):
            conn.sendall(b"echo\n")
            echo_round_trip(conn)
        link.reset()
        for conn in (first, second):
            with pytest.raises(ConnectionResetError):
                conn.sendall(b"p")
                assert conn.recv(1) == b"", "a reset connection answered"
                raise ConnectionResetError  # closed cleanly: also gone
            conn.close()
        with connect(link) as third:
            third.sendall(b"echo\n")
            echo_round_trip(third)
        assert link.stats()["accepted"] == 3
