"""The resumable multiplexed streams without I/O: exactly once and in order across cuts, credit, bounded memory."""

from __future__ import annotations

import random

import pytest

from relaykernel.common.mux import Mux, ProtocolError, encode


class Pair:
    """Two muxes joined by a lossy transport: a cut loses whatever was in flight, as a dropped link does."""

    def __init__(self, **options: int) -> None:
        self.laptop, self.vm = Mux(**options), Mux(**options)
        self.wire = {"up": b"", "down": b""}
        self.got: dict[str, dict[int, bytes]] = {"laptop": {}, "vm": {}}
        self.closed: dict[str, set[int]] = {"laptop": set(), "vm": set()}
        self.controls: list[dict] = []

    def pump(self, rounds: int = 50, chunk: int = 100_000, consume: bool = True) -> None:
        for _ in range(rounds):
            self.wire["up"] += self.laptop.take(chunk)
            self.wire["down"] += self.vm.take(chunk)
            up, self.wire["up"] = self.wire["up"], b""
            down, self.wire["down"] = self.wire["down"], b""
            self._deliver("vm", self.vm, up, consume)
            self._deliver("laptop", self.laptop, down, consume)
            if not (up or down or self.laptop.has_output() or self.vm.has_output()):
                return

    def _deliver(self, side: str, mux: Mux, data: bytes, consume: bool) -> None:
        for kind, stream, value in mux.feed(data):
            if kind == "data":
                self.got[side][stream] = self.got[side].get(stream, b"") + value
                if consume:
                    mux.consumed(stream, len(value))
            elif kind == "close":
                self.closed[side].add(stream)
            elif kind == "control":
                self.controls.append(value)

    def cut(self, keep_up: int = 0, keep_down: int = 0) -> None:
        """Lose what is in flight (but the first bytes, which arrive before the cut), then a new transport."""
        self.wire["up"], self.wire["down"] = self.wire["up"][:keep_up], self.wire["down"][:keep_down]
        up, down = self.wire["up"], self.wire["down"]
        self.wire = {"up": b"", "down": b""}
        self._deliver("vm", self.vm, up, True)
        self._deliver("laptop", self.laptop, down, True)
        self.laptop.new_transport()
        self.vm.new_transport()


def test_streams_arrive_whole_and_in_order_across_cuts() -> None:
    rng = random.Random(7)
    pair = Pair()
    sent = {1: b"", 2: b""}
    pair.laptop.open(1, "shell_port")
    pair.laptop.open(2, "iopub_port")
    pair.pump()
    for round_number in range(40):
        for stream in (1, 2):
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5000)))
            sent[stream] += data
            pair.vm.send(stream, data)
        pair.wire["down"] += pair.vm.take(rng.randrange(1, 20000))
        if round_number % 7 == 3:
            pair.cut(keep_down=rng.randrange(0, 3000))
        pair.pump(rounds=2)
    pair.pump()
    assert pair.got["laptop"] == sent
    pair.laptop.flush_acks()  # the I/O layer does this with every keepalive
    pair.pump()
    assert pair.vm.buffered_bytes() == 0, "everything acknowledged is released"
    assert pair.vm.resent_bytes > 0, "the cuts lost bytes in flight, so some were replayed"


def test_close_and_open_survive_a_cut() -> None:
    pair = Pair()
    pair.laptop.open(5, "hb_port")
    pair.laptop.send(5, b"ping")
    pair.laptop.close(5)
    pair.wire["up"] += pair.laptop.take(1 << 20)
    pair.cut()  # all of it lost in flight
    pair.pump()
    assert pair.got["vm"] == {5: b"ping"}
    assert pair.closed["vm"] == {5}


def test_a_stalled_consumer_does_not_block_other_streams() -> None:
    window = 1 << 20
    pair = Pair(stream_window_bytes=window)
    pair.laptop.open(1, "iopub_port")
    pair.laptop.open(2, "shell_port")
    pair.pump()
    pair.vm.send(1, b"x" * (3 * window))
    pair.pump(consume=False)  # nobody reads iopub on the laptop
    pair.vm.send(2, b"reply")
    pair.pump(consume=False)
    assert pair.got["laptop"][2] == b"reply"
    assert len(pair.got["laptop"][1]) == window, "iopub stops at its window"


def test_control_frames_are_not_replayed() -> None:
    pair = Pair()
    pair.laptop.control({"op": "renew"})
    pair.pump()
    pair.cut()
    pair.pump()
    assert pair.controls == [{"op": "renew"}]


def test_a_resume_outside_the_log_is_a_protocol_error() -> None:
    mux = Mux()
    with pytest.raises(ProtocolError):
        mux.feed(encode(15, 0, (10**9).to_bytes(8, "big") + (10**9).to_bytes(8, "big")))


def test_a_control_request_made_during_a_cut_goes_out_on_the_next_transport() -> None:
    pair = Pair()
    pair.laptop.control({"op": "signal", "signum": 2})  # queued while no transport carries it
    pair.cut()
    pair.pump()
    assert pair.controls == [{"op": "signal", "signum": 2}]


def test_a_silent_stream_opened_and_closed_during_a_cut_leaves_no_trace() -> None:
    pair = Pair()
    pair.laptop.new_transport()  # a transport that is not there yet: nothing leaves
    for stream in range(1, 101):  # a client that connects and gives up, again and again, during an outage
        pair.laptop.open(stream, "hb_port")
        pair.laptop.close(stream)
    assert pair.laptop.buffered_bytes() == 0
    pair.pump()
    assert pair.got["vm"] == {} and pair.closed["vm"] == set(), "nothing of them ever crosses"
