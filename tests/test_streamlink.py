"""The laptop's StreamLink against an in-process VM end: listeners, held clients, resume across cuts, clean stops.

The VM end here is the real ``Mux`` behind a socketpair that echoes each stream upper-cased; the end-to-end
tests run the real supervisor through real OpenSSH.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from relaykernel.common.errors import ForwardBindError
from relaykernel.common.mux import Mux
from relaykernel.common.protocol import PORT_NAMES
from relaykernel.link import StreamLink


class EchoVM:
    """A VM end that upper-cases every stream's bytes back; its transport can be cut and replaced."""

    def __init__(self) -> None:
        self.mux = Mux()
        self.seen: list[str] = []  # the kinds of events, in order
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-echo-vm", daemon=True)
        self.thread.start()

    def transport(self, *, resume: bool) -> socket.socket:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        with self.lock:
            if self.sock is not None:
                self.sock.close()
            if resume:
                self.mux.new_transport()
            self.sock = ours
        return theirs

    def cut(self) -> None:
        with self.lock:
            if self.sock is not None:
                self.sock.close()
                self.sock = None

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.cut()

    def _run(self) -> None:
        while not self.stopping.wait(0.002):
            with self.lock:
                if self.sock is None:
                    continue
                try:
                    data = self.sock.recv(1 << 20)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    self.sock.close()
                    self.sock = None
                    continue
                for kind, stream, value in self.mux.feed(data or b""):
                    self.seen.append(kind)
                    if kind == "control" and value.get("op") == "signal":
                        self.mux.control({"event": "signalled", "signum": value["signum"]})
                    if kind == "data":
                        self.mux.send(stream, value.upper())
                        self.mux.consumed(stream, len(value))
                    elif kind == "close":
                        self.mux.close(stream)
                self.mux.flush_acks()
                out = self.mux.take(1 << 20)
                if out:
                    try:
                        self.sock.setblocking(True)
                        self.sock.sendall(out)
                        self.sock.setblocking(False)
                    except OSError:
                        self.sock.close()
                        self.sock = None


@pytest.fixture
def link() -> Iterator[StreamLink]:
    downs: list[str] = []
    link = StreamLink(local_ports=dict.fromkeys(PORT_NAMES, 0), buffer_limit_bytes=1 << 24, keepalive_seconds=0.2,
                      silence_seconds=30.0, on_down=downs.append, answer_handshakes=False)  # the echo is no ZMTP
    link.start()
    yield link
    link.stop()


@pytest.fixture
def vm() -> Iterator[EchoVM]:
    vm = EchoVM()
    yield vm
    vm.stop()


def connect(link: StreamLink, name: str) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", link.local_ports[name]), timeout=5)
    client.settimeout(5)
    return client


def receive(client: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = client.recv(size - len(data))
        assert chunk, "the local connection was closed"
        data += chunk
    return data


def test_listens_on_loopback_only_and_names_a_taken_port() -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        link = StreamLink(local_ports={**dict.fromkeys(PORT_NAMES, 0), "hb_port": port}, buffer_limit_bytes=1 << 20,
                          keepalive_seconds=1, silence_seconds=5)
        with pytest.raises(ForwardBindError, match=f"127.0.0.1:{port}"):
            link.start()
    finally:
        taken.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("relaykernel-link")]


def test_a_client_that_comes_before_the_kernel_is_held_then_served(link: StreamLink, vm: EchoVM) -> None:
    client = connect(link, "shell_port")
    client.sendall(b"early")
    time.sleep(0.2)
    link.begin_session(vm.transport(resume=False))
    assert receive(client, 5) == b"EARLY"
    client.close()


def test_streams_resume_across_cuts_without_the_client_noticing(link: StreamLink, vm: EchoVM) -> None:
    link.begin_session(vm.transport(resume=False))
    client = connect(link, "iopub_port")
    expected = b""
    for round_number in range(6):
        payload = (b"round-%d " % round_number) * 20000
        client.sendall(payload)
        expected += payload.upper()
        time.sleep(0.01)
        vm.cut()  # whatever was in flight is lost
        link.resume(vm.transport(resume=True))
    assert receive(client, len(expected)) == expected
    assert link.accepted["iopub_port"] == 1
    client.close()


def test_a_session_end_closes_its_clients_and_the_next_kernel_gets_new_ones(link: StreamLink, vm: EchoVM) -> None:
    link.begin_session(vm.transport(resume=False))
    client = connect(link, "control_port")
    client.sendall(b"x")
    assert receive(client, 1) == b"X"
    link.end_session()
    assert client.recv(10) == b"", "the old kernel's connection is closed"
    newcomer = connect(link, "control_port")
    newcomer.sendall(b"y")
    link.begin_session(vm.transport(resume=False))
    assert receive(newcomer, 1) == b"Y"
    newcomer.close()
    client.close()


def test_control_requests_time_out_without_a_session(link: StreamLink) -> None:
    assert link.request({"op": "status"}, {"status"}, 0.2) is None


def test_a_posted_control_line_goes_ahead_of_later_bytes_and_its_answer_comes_back_later(link: StreamLink,
                                                                                         vm: EchoVM) -> None:
    link.begin_session(vm.transport(resume=False))
    client = connect(link, "control_port")
    client.sendall(b"a")
    assert receive(client, 1) == b"A"
    answers: queue.Queue[dict | None] = queue.Queue()
    vm.seen.clear()
    assert link.post({"op": "signal", "signum": 2}, {"signalled"}, 5.0, answers.put)
    client.sendall(b"b")  # a shutdown_request right after an interrupt: the signal must reach the VM first
    assert receive(client, 1) == b"B"
    assert answers.get(timeout=5) == {"event": "signalled", "signum": 2}
    assert vm.seen.index("control") < vm.seen.index("data")
    assert link.post({"op": "unheard-of"}, {"never"}, 0.3, answers.put)
    assert answers.get(timeout=5) is None, "an unanswered line is reported once its time is up"
    link.end_session()
    assert not link.post({"op": "signal", "signum": 2}, {"signalled"}, 5.0, answers.put), "no session: not sent"
    client.close()
