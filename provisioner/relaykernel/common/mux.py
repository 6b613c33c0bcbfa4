"""The resumable multiplexed byte streams between laptop and VM, without I/O: frames, credit, replay, resume.

Both ends run one ``Mux`` over whatever transport is up (an SSH channel to the VM's supervisor). Each forwarded
TCP connection is a stream. Stream frames (OPEN, DATA, CLOSE) are *reliable*: every byte of them is numbered, kept
in a replay log until the peer acknowledges it, and resent after the transport is replaced, so each arrives
exactly once and in order however often the link drops. Other frames (CONTROL, ACK, CREDIT, PING, PONG, RESUME)
belong to one transport and are simply sent again when needed. After a new transport comes up each side first
says how many reliable bytes it has received (RESUME); the other drops what is acknowledged and resends the rest.

Per-stream credit keeps one slow consumer from stalling the others: a side frames DATA for a stream only while
``sent < consumed-by-peer + stream_window_bytes``. Reliable frames are picked round-robin across streams, so a
reply never queues behind more than one frame of another stream's bulk output here. The I/O layer bounds memory
by reading its sources only while ``buffered_bytes() < limit``.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from typing import Any, Tuple  # noqa: UP035 - Tuple is evaluated at import on Python 3.8

HEADER = struct.Struct("!BII")  # kind, stream id, payload length
OFFSET = struct.Struct("!Q")

OPEN, DATA, CLOSE = 1, 2, 3  # reliable
CONTROL, ACK, CREDIT, PING, PONG, RESUME = 10, 11, 12, 13, 14, 15  # per transport
RELIABLE = (OPEN, DATA, CLOSE)

FRAME_PAYLOAD_BYTES = 64 * 1024
ALONE_FRAME_FACTOR = 4
STREAM_WINDOW_BYTES = 16 * 1024 * 1024  # at least the largest SSH window (pacing.py): never the cap
ACK_EVERY_BYTES = 256 * 1024
MAX_PAYLOAD_BYTES = 1 << 24

Event = Tuple[str, int, Any]  # noqa: UP006 - evaluated at import, and the VM side runs on Python 3.8
"""("open", stream, port name) | ("data", stream, bytes) | ("close", stream, None) | ("control", 0, dict) |
("pong", 0, sent-at nanoseconds) | ("resumed", 0, (bytes we resend, bytes the peer resends)) — what ``feed``
reports to the I/O layer."""


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def encode(kind: int, stream: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream, len(payload)) + payload


class _Stream:
    """One stream's counters on this side."""

    __slots__ = ("sent", "peer_consumed", "delivered", "consumed", "credited", "pending", "pending_bytes",
                 "closing")

    def __init__(self) -> None:
        self.sent = 0  # DATA payload bytes framed for the peer
        self.peer_consumed = 0  # payload bytes the peer wrote out (its CREDIT)
        self.delivered = 0  # DATA payload bytes handed to our I/O layer
        self.consumed = 0  # of those, bytes our I/O layer wrote out
        self.credited = 0  # the consumed count last announced to the peer
        self.pending: deque[bytes] = deque()  # payload not yet framed
        self.pending_bytes = 0
        self.closing = False  # CLOSE queued behind pending


class Mux:
    """One side's state of the resumable session; the I/O layer feeds bytes in and takes bytes out."""

    def __init__(self, *, stream_window_bytes: int = STREAM_WINDOW_BYTES,
                 frame_payload_bytes: int = FRAME_PAYLOAD_BYTES) -> None:
        self.stream_window_bytes = stream_window_bytes
        self.frame_payload_bytes = frame_payload_bytes
        self.received = 0  # reliable bytes received, always at a frame boundary
        self.sent = 0  # reliable bytes framed (offset of the log's end)
        self.resent_bytes = 0  # replayed after transport changes, in total
        self._acked = 0
        self._ack_announced = 0
        self._log: deque[tuple[int, bytes]] = deque()  # (start offset, frame) sent, not yet acknowledged
        self._log_bytes = 0
        self._resend: deque[bytes] = deque()
        self._urgent: deque[bytes] = deque()
        self._streams: dict[int, _Stream] = {}
        self._ready: dict[int, None] = {}  # streams that may have something to frame, in round-robin order
        self._opens: dict[int, bytes] = {}  # OPEN frames not sent yet, in order; they go before any data
        self._inbuf = bytearray()
        self._awaiting_resume = False

    # ---- what the local side puts in

    def open(self, stream: int, port_name: str) -> None:
        """A new local connection for ``port_name`` (laptop side)."""
        self._streams[stream] = _Stream()
        self._opens[stream] = encode(OPEN, stream, port_name.encode())

    def accept(self, stream: int) -> None:
        """The peer opened ``stream`` (VM side): start counting it."""
        self._streams.setdefault(stream, _Stream())

    def send(self, stream: int, data: bytes) -> None:
        state = self._streams.get(stream)
        if state is None or state.closing or not data:
            return
        state.pending.append(data)
        state.pending_bytes += len(data)
        self._ready[stream] = None

    def close(self, stream: int) -> None:
        """The local end of ``stream`` is gone: CLOSE follows its pending data; the stream is forgotten."""
        state = self._streams.get(stream)
        if state is not None and not state.pending_bytes and self._opens.pop(stream, None) is not None:
            del self._streams[stream]  # the peer never heard of it and it said nothing: no trace at all
            self._ready.pop(stream, None)
        elif state is not None and not state.closing:
            state.closing = True
            self._ready[stream] = None

    def consumed(self, stream: int, count: int) -> None:
        """The I/O layer wrote ``count`` more delivered bytes of ``stream`` out: the peer may send more."""
        state = self._streams.get(stream)
        if state is None:
            return
        state.consumed += count
        if state.consumed - state.credited >= self.stream_window_bytes // 4:
            self._credit(stream, state)

    def control(self, message: dict[str, Any]) -> None:
        self._urgent.append(encode(CONTROL, 0, json.dumps(message).encode()))

    def ping(self, now_ns: int) -> None:
        self._urgent.append(encode(PING, 0, OFFSET.pack(now_ns)))

    def flush_acks(self) -> None:
        """Acknowledge what arrived and re-announce credit (call now and then, e.g. with each ping)."""
        if self.received != self._ack_announced:
            self._ack_announced = self.received
            self._urgent.append(encode(ACK, 0, OFFSET.pack(self.received)))
        for stream, state in self._streams.items():
            if state.consumed != state.credited:
                self._credit(stream, state)

    def new_transport(self) -> None:
        """A fresh transport replaces the old one: say how far we got; hold stream frames until the peer does."""
        self._inbuf.clear()
        controls = [frame for frame in self._urgent if frame[0] == CONTROL]  # requests made during the cut still go
        self._urgent.clear()
        self._resend.clear()
        self._awaiting_resume = True
        self._urgent.append(encode(RESUME, 0, OFFSET.pack(self.received) + OFFSET.pack(self.sent)))
        self._urgent.extend(controls)
        self._ack_announced = self.received
        for stream, state in self._streams.items():
            self._credit(stream, state)

    # ---- what the I/O layer sends

    def take(self, max_bytes: int) -> bytes:
        """The next bytes for the transport: per-transport frames, then resends, then streams round-robin."""
        out: list[bytes] = []
        size = 0
        while self._urgent and size < max_bytes:
            frame = self._urgent.popleft()
            out.append(frame)
            size += len(frame)
        if self._awaiting_resume:
            return b"".join(out)
        while self._resend and size < max_bytes:
            frame = self._resend.popleft()
            out.append(frame)
            size += len(frame)
        while size < max_bytes:
            next_frame = self._next_stream_frame(max_bytes - size)
            if next_frame is None:
                break
            frame = next_frame
            self._log.append((self.sent, frame))
            self._log_bytes += len(frame)
            self.sent += len(frame)
            out.append(frame)
            size += len(frame)
        return b"".join(out)

    def has_output(self) -> bool:
        """True when ``take`` would return something (or might, once credit arrives: then False)."""
        if self._urgent:
            return True
        if self._awaiting_resume:
            return False
        return bool(self._resend or self._opens or any(self._sendable(s) for s in self._ready))

    def buffered_bytes(self) -> int:
        """Bytes this side holds for the peer: the unacknowledged log plus what is not framed yet."""
        return self._log_bytes + sum(state.pending_bytes for state in self._streams.values())

    def stream_backlog(self, stream: int) -> int:
        """Bytes delivered to the I/O layer for ``stream`` and not yet written out."""
        state = self._streams.get(stream)
        return 0 if state is None else state.delivered - state.consumed

    # ---- what arrives

    def feed(self, data: bytes) -> list[Event]:
        """Parse whatever complete frames ``data`` completes; the events for the I/O layer."""
        self._inbuf += data
        events: list[Event] = []
        offset = 0
        while len(self._inbuf) - offset >= HEADER.size:
            kind, stream, length = HEADER.unpack_from(self._inbuf, offset)
            if length > MAX_PAYLOAD_BYTES:
                raise ProtocolError(f"a frame of {length} bytes (kind {kind}) is over the limit")
            end = offset + HEADER.size + length
            if len(self._inbuf) < end:
                break
            payload = bytes(self._inbuf[offset + HEADER.size:end])
            if kind in RELIABLE:
                self.received += end - offset
            event = self._on_frame(kind, stream, payload)
            if event is not None:
                events.append(event)
            offset = end
        del self._inbuf[:offset]
        if self.received - self._ack_announced >= ACK_EVERY_BYTES:
            self._ack_announced = self.received
            self._urgent.append(encode(ACK, 0, OFFSET.pack(self.received)))
        return events

    def _on_frame(self, kind: int, stream: int, payload: bytes) -> Event | None:
        if kind == DATA:
            state = self._streams.get(stream)
            if state is None:  # closed here meanwhile: the peer's CLOSE-less data is dropped, as TCP would
                return None
            state.delivered += len(payload)
            return ("data", stream, payload)
        if kind == OPEN:
            self.accept(stream)
            return ("open", stream, payload.decode(errors="replace"))
        if kind == CLOSE:
            return ("close", stream, None) if self._streams.pop(stream, None) is not None else None
        if kind == CONTROL:
            message = json.loads(payload)
            return ("control", 0, message if isinstance(message, dict) else {})
        if kind == ACK:
            self._acknowledge(OFFSET.unpack(payload)[0])
        elif kind == CREDIT:
            state = self._streams.get(stream)
            if state is not None:
                state.peer_consumed = max(state.peer_consumed, OFFSET.unpack(payload)[0])
                self._ready[stream] = None
        elif kind == PING:
            self._urgent.append(encode(PONG, 0, payload))
        elif kind == PONG:
            return ("pong", 0, OFFSET.unpack(payload)[0])
        elif kind == RESUME:
            peer_received, peer_sent = OFFSET.unpack_from(payload, 0)[0], OFFSET.unpack_from(payload, 8)[0]
            return ("resumed", 0, (self._resume_from(peer_received), max(0, peer_sent - self.received)))
        else:
            raise ProtocolError(f"unknown frame kind {kind}")
        return None

    def _acknowledge(self, offset: int) -> None:
        while self._log and self._log[0][0] + len(self._log[0][1]) <= offset:
            _, frame = self._log.popleft()
            self._log_bytes -= len(frame)
        self._acked = max(self._acked, offset)

    def _resume_from(self, offset: int) -> int:
        if offset < self._acked or offset > self.sent:
            raise ProtocolError(f"the peer resumes at byte {offset}, outside {self._acked}..{self.sent}")
        self._acknowledge(offset)
        self._resend = deque(frame for _, frame in self._log)
        self._awaiting_resume = False
        resent = sum(len(frame) for frame in self._resend)
        self.resent_bytes += resent
        return resent

    def _credit(self, stream: int, state: _Stream) -> None:
        state.credited = state.consumed
        self._urgent.append(encode(CREDIT, stream, OFFSET.pack(state.consumed)))

    def _sendable(self, stream: int) -> bool:
        state = self._streams.get(stream)
        if state is None:
            return False
        if state.pending_bytes:
            return state.sent < state.peer_consumed + self.stream_window_bytes
        return state.closing

    def _next_stream_frame(self, room: int) -> bytes | None:
        for stream in self._opens:
            return self._opens.pop(stream)
        for stream in list(self._ready):
            del self._ready[stream]
            if not self._sendable(stream):
                continue  # out of the rotation until it gets data, credit or a close
            frame = self._frame_for(stream, room, alone=not self._ready)
            if stream in self._streams:
                self._ready[stream] = None  # its turn again after the others
            return frame
        return None

    def _frame_for(self, stream: int, room: int, *, alone: bool) -> bytes:
        state = self._streams[stream]
        if not state.pending_bytes:
            del self._streams[stream]
            return encode(CLOSE, stream)
        credit = state.peer_consumed + self.stream_window_bytes - state.sent
        # Alone, a stream may send bigger frames (less work per byte); with others waiting, one frame at most.
        largest = self.frame_payload_bytes * (ALONE_FRAME_FACTOR if alone else 1)
        size = max(1, min(largest, credit, room))
        chunk = state.pending.popleft()
        if len(chunk) > size:
            chunk, rest = chunk[:size], chunk[size:]
            state.pending.appendleft(rest)
        state.pending_bytes -= len(chunk)
        state.sent += len(chunk)
        return encode(DATA, stream, chunk)
