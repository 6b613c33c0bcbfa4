"""ZeroMQ's handshake across the link in no round trip: the laptop answers it, the VM holds what follows it.

ZMTP (ZeroMQ's wire protocol) opens every connection with a greeting each way and a READY command each way, each
side waiting for the other's: across the link that is two round trips before a client's first request even leaves
(``kernel_info`` after a start or a restart, on each of the five ports). Jupyter's sockets use the NULL mechanism and
always the same socket types, so:

- the laptop's end answers a new client at once with what the kernel's socket would say (``kernel_handshake``), and
  drops the kernel's own greeting and READY when they arrive (``KernelHandshakeFilter``); the client's greeting and
  READY travel to the kernel untouched, so the kernel learns the client's identity as always;
- the VM's end passes a client's greeting and READY to the kernel but holds whatever the client sent after them until
  the kernel's own READY has gone out (``ClientGate``): libzmq takes a message that arrives before it has sent its
  READY for a broken handshake.

Anything but a NULL-mechanism ZMTP 3 handshake turns both off for that connection (and the laptop's answer off for
the link: the client's reconnect then goes the plain way). Standard library only: the VM side uses it too.
"""

from __future__ import annotations

import struct

# The kernel's end of each Jupyter port (ipykernel: ROUTER sockets, a ROUTER heartbeat, a PUB/XPUB for iopub).
# A client checks only that the peer's type fits its own: DEALER/REQ with ROUTER, SUB with PUB.
KERNEL_SOCKET_TYPES = {
    "shell_port": b"ROUTER",
    "control_port": b"ROUTER",
    "stdin_port": b"ROUTER",
    "hb_port": b"ROUTER",
    "iopub_port": b"PUB",
}
GREETING_BYTES = 64
_SIGNATURE_FIRST, _SIGNATURE_LAST = 0xFF, 0x7F
_NULL_MECHANISM = b"NULL".ljust(20, b"\0")
_COMMAND, _LONG = 0x04, 0x02


class HandshakeError(Exception):
    """One end of a connection did not open the way Jupyter's sockets do."""


def kernel_handshake(port_name: str) -> bytes:
    """The greeting and READY the kernel's socket on ``port_name`` would send.

    It claims ZMTP 3.0: a newer client then keeps to what every kernel understands (subscriptions as messages).
    """
    greeting = bytes([_SIGNATURE_FIRST]) + bytes(8) + bytes([_SIGNATURE_LAST, 3, 0]) + _NULL_MECHANISM + bytes(32)
    name, value = b"Socket-Type", KERNEL_SOCKET_TYPES[port_name]
    body = b"\x05READY" + bytes([len(name)]) + name + struct.pack(">I", len(value)) + value
    return greeting + bytes([_COMMAND, len(body)]) + body


class HandshakeScanner:
    """Finds where one side's greeting and first command (its READY) end, in a byte stream fed in pieces."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.done = False

    def feed(self, data: bytes) -> int | None:
        """How many bytes of ``data`` complete the handshake (0 once it is done); None while it goes on.

        HandshakeError when the bytes are not a NULL-mechanism ZMTP 3 handshake followed by READY.
        """
        if self.done:
            return 0
        before = len(self._buffer)
        self._buffer += data
        end = _handshake_end(self._buffer)
        if end is None:
            return None
        self.done = True
        self._buffer = bytearray()
        return end - before


class KernelHandshakeFilter:
    """The laptop's end: drops the kernel's greeting and READY from what the VM sends for one connection."""

    def __init__(self) -> None:
        self._scanner = HandshakeScanner()

    @property
    def done(self) -> bool:
        return self._scanner.done

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """(the bytes for the client, how many of ``data`` were dropped); HandshakeError on a foreign handshake."""
        end = self._scanner.feed(data)
        if end is None:
            return b"", len(data)
        return data[end:], end


class ClientGate:
    """The VM's end: what of the client's bytes may go to the kernel now, and what must wait for its READY."""

    def __init__(self) -> None:
        self._client = HandshakeScanner()
        self._kernel = HandshakeScanner()
        self.open = False  # the kernel's READY went out (or the gate is off): everything passes

    def from_client(self, data: bytes) -> tuple[bytes, bytes]:
        """(to the kernel now, to hold until ``from_kernel`` says the gate opened)."""
        if self.open or self._client.done:
            return (data, b"") if self.open else (b"", data)
        try:
            end = self._client.feed(data)
        except HandshakeError:
            self.open = True
            return data, b""
        return (data, b"") if end is None else (data[:end], data[end:])

    def from_kernel(self, data: bytes) -> bool:
        """Feed what the kernel sent; True when the gate opens with it (release what was held)."""
        if self.open:
            return False
        try:
            if self._kernel.feed(data) is None:
                return False
        except HandshakeError:
            pass
        self.open = True
        return True


def _handshake_end(buffer: bytearray) -> int | None:
    if buffer[:1] and buffer[0] != _SIGNATURE_FIRST or len(buffer) >= 10 and buffer[9] != _SIGNATURE_LAST:
        raise HandshakeError("the other end does not speak ZMTP 3")
    if len(buffer) < GREETING_BYTES:
        return None
    if buffer[10] != 3 or bytes(buffer[12:32]) != _NULL_MECHANISM:
        raise HandshakeError(f"the other end speaks ZMTP {buffer[10]}.{buffer[11]} with mechanism "
                             f"{bytes(buffer[12:32]).rstrip(bytes(1))!r}, not 3.x with NULL")
    at = GREETING_BYTES
    if len(buffer) < at + 2:
        return None
    flags = buffer[at]
    if not flags & _COMMAND:
        raise HandshakeError("the other end sent a message before its READY")
    if flags & _LONG:
        if len(buffer) < at + 9:
            return None
        size, start = struct.unpack(">Q", bytes(buffer[at + 1:at + 9]))[0], at + 9
    else:
        size, start = buffer[at + 1], at + 2
    if len(buffer) < start + size:
        return None
    if bytes(buffer[start:start + 6]) != b"\x05READY":
        raise HandshakeError(f"the other end answered {bytes(buffer[start:start + 16])!r}, not READY")
    return start + size
