"""ZeroMQ's handshake in no round trip: real libzmq sockets on both ends of a relay that plays both ends of a stream
(the laptop greets the client at once and drops the kernel's own greeting; the VM holds what the client sends after
its READY until the kernel's READY went out)."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import zmq

from relaykernel.common.zmtp import ClientGate, HandshakeError, KernelHandshakeFilter, kernel_handshake

TIMEOUT_MS = 5000


@contextmanager
def answering_relay(kernel_port: int, port_name: str) -> Iterator[tuple[int, list[str]]]:
    """A loopback listener relaying one client to the kernel's port the way the laptop's link does."""
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[str] = []
    stop = threading.Event()

    def run() -> None:
        client, _ = listener.accept()
        client.sendall(kernel_handshake(port_name))  # the laptop's end, before the kernel has said anything
        kernel = socket.create_connection(("127.0.0.1", kernel_port))
        handshake, gate, held = KernelHandshakeFilter(), ClientGate(), bytearray()
        with selectors.DefaultSelector() as selector, client, kernel:
            selector.register(client, selectors.EVENT_READ)
            selector.register(kernel, selectors.EVENT_READ)
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                for key, _ in selector.select(0.05):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    if key.fileobj is client:
                        now, later = gate.from_client(data)
                        kernel.sendall(now)
                        held += later
                        continue
                    if gate.from_kernel(data):  # the VM's end: the kernel's READY is out, release the rest
                        kernel.sendall(held)
                        held.clear()
                    try:
                        data, _dropped = handshake.feed(data)
                    except HandshakeError as error:
                        errors.append(str(error))
                        return
                    client.sendall(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], errors
    finally:
        stop.set()
        thread.join(10)
        listener.close()


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_a_dealer_and_a_router_talk_through_the_answered_handshake(context):
    kernel = context.socket(zmq.ROUTER)
    port = kernel.bind_to_random_port("tcp://127.0.0.1")
    with answering_relay(port, "shell_port") as (relay_port, errors):
        client = context.socket(zmq.DEALER)
        client.setsockopt(zmq.IDENTITY, b"client-7")
        client.connect(f"tcp://127.0.0.1:{relay_port}")
        client.send(b"kernel_info_request")
        assert kernel.poll(TIMEOUT_MS), f"the kernel got nothing ({errors})"
        identity, body = kernel.recv_multipart()
        assert (identity, body) == (b"client-7", b"kernel_info_request"), "the client's identity reached the kernel"
        kernel.send_multipart([identity, b"kernel_info_reply"])
        assert client.poll(TIMEOUT_MS), f"the reply never came back ({errors})"
        assert client.recv() == b"kernel_info_reply"
        assert not errors


def test_a_subscriber_gets_what_the_kernel_publishes_after_it_subscribed(context):
    kernel = context.socket(zmq.XPUB)  # ipykernel's iopub: it sees the subscription arrive
    port = kernel.bind_to_random_port("tcp://127.0.0.1")
    with answering_relay(port, "iopub_port") as (relay_port, errors):
        client = context.socket(zmq.SUB)
        client.setsockopt(zmq.SUBSCRIBE, b"")
        client.connect(f"tcp://127.0.0.1:{relay_port}")
        assert kernel.poll(TIMEOUT_MS), f"the subscription never reached the kernel ({errors})"
        assert kernel.recv() == b"\x01"
        kernel.send(b"status: idle")
        assert client.poll(TIMEOUT_MS), f"nothing published arrived ({errors})"
        assert client.recv() == b"status: idle"
        assert not errors


def test_heartbeats_echo_through_a_router(context):
    kernel = context.socket(zmq.ROUTER)  # ipykernel's heartbeat echoes on a ROUTER
    port = kernel.bind_to_random_port("tcp://127.0.0.1")
    with answering_relay(port, "hb_port") as (relay_port, errors):
        client = context.socket(zmq.REQ)
        client.connect(f"tcp://127.0.0.1:{relay_port}")
        client.send(b"ping")
        assert kernel.poll(TIMEOUT_MS), f"no ping ({errors})"
        kernel.send_multipart(kernel.recv_multipart())
        assert client.poll(TIMEOUT_MS) and client.recv() == b"ping"


def test_a_foreign_handshake_is_refused_in_pieces_or_whole():
    ours = kernel_handshake("shell_port")
    fine = KernelHandshakeFilter()
    passed = b"".join(fine.feed(ours[i:i + 7])[0] for i in range(0, len(ours), 7))
    assert fine.done and passed == b"", "the kernel's handshake, however cut, never reaches the client"
    assert fine.feed(b"\x00\x03abc") == (b"\x00\x03abc", 0), "after it, every byte passes"
    curve = bytearray(ours)
    curve[12:32] = b"CURVE".ljust(20, b"\0")
    with pytest.raises(HandshakeError, match="CURVE"):
        KernelHandshakeFilter().feed(bytes(curve))
    with pytest.raises(HandshakeError, match="ZMTP 3"):
        KernelHandshakeFilter().feed(b"HTTP/1.1 400")


def test_the_gate_holds_what_follows_the_clients_ready_until_the_kernels_ready():
    client_bytes = kernel_handshake("shell_port") + b"\x00\x02hi"  # any ZMTP 3 greeting and READY, then a message
    gate = ClientGate()
    now, later = gate.from_client(client_bytes[:30])
    assert (now, later) == (client_bytes[:30], b"")
    now, later = gate.from_client(client_bytes[30:])
    assert now + later == client_bytes[30:] and later == b"\x00\x02hi"
    assert gate.from_client(b"more") == (b"", b"more"), "held until the kernel's READY"
    kernel_bytes = kernel_handshake("shell_port")
    assert not gate.from_kernel(kernel_bytes[:64])
    assert gate.from_kernel(kernel_bytes[64:]), "its READY opens the gate"
    assert gate.from_client(b"after") == (b"after", b""), "then everything passes"
    plain = ClientGate()
    assert plain.from_client(b"GET / HTTP/1.1") == (b"GET / HTTP/1.1", b""), "not ZMTP: the gate is off"
