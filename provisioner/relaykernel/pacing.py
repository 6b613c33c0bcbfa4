"""Size the kernel channel's receive window to the measured link: full speed, without a long queue before replies.

Delay-based, in the manner of LEDBAT: the round trip of the link's keepalive pings rises when bytes queue on the
path. While the queueing delay stays under ``queue_target_seconds`` and the window limits the rate (bytes in
flight, rate × round trip, fill most of it), the window grows fourfold per interval up to ``maximum_bytes``; when
the delay rises past the target it shrinks toward rate × (base round trip + target), never below ``minimum_bytes``.
On a short fast path the window never limits the rate, so it never grows.
"""

from __future__ import annotations

import time
from collections import deque

INITIAL_BYTES = 2 * 1024 * 1024
MINIMUM_BYTES = 256 * 1024
MAXIMUM_BYTES = 16 * 1024 * 1024
QUEUE_TARGET_SECONDS = 0.05
BASE_RTT_MEMORY_SECONDS = 60.0


class WindowSizer:
    """Feed it round-trip samples and received byte counts; ask it for the window now and then."""

    def __init__(self, *, initial_bytes: int = INITIAL_BYTES, minimum_bytes: int = MINIMUM_BYTES,
                 maximum_bytes: int = MAXIMUM_BYTES, queue_target_seconds: float = QUEUE_TARGET_SECONDS) -> None:
        self.window = initial_bytes
        self.minimum_bytes = minimum_bytes
        self.maximum_bytes = maximum_bytes
        self.queue_target_seconds = queue_target_seconds
        self._rtts: deque[tuple[float, float]] = deque()  # (when, round trip)
        self._received = 0
        self._since = time.monotonic()
        self._first_byte = self._since  # when the first byte since the last update came
        self._latest_rtt: float | None = None

    def observe_rtt(self, seconds: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._rtts.append((now, seconds))
        self._latest_rtt = seconds
        while self._rtts and self._rtts[0][0] < now - BASE_RTT_MEMORY_SECONDS:
            self._rtts.popleft()

    def observe_bytes(self, count: int, now: float | None = None) -> None:
        if not self._received:
            self._first_byte = time.monotonic() if now is None else now
        self._received += count

    @property
    def receiving(self) -> bool:
        """True when bytes came in since the last ``update``."""
        return self._received > 0

    @property
    def base_rtt(self) -> float | None:
        return min(rtt for _, rtt in self._rtts) if self._rtts else None

    def update(self, now: float | None = None, *, may_shrink: bool = True) -> int:
        """The window for the next interval, from what was seen since the last call (``may_shrink``: or only grow)."""
        now = time.monotonic() if now is None else now
        started, received = max(self._since, self._first_byte), self._received
        self._since, self._received = now, 0
        base, latest = self.base_rtt, self._latest_rtt
        if base is None or latest is None:
            return self.window
        # The rate while bytes came: an output that starts mid-interval is not diluted by the idle part before it
        # (the first sizing of a transfer sees its real rate, a round trip sooner), over at least half a base round
        # trip (a single early packet is no rate).
        rate = received / max(now - started, base / 2, 1e-3)
        fitting = max(self.minimum_bytes, int(rate * (base + self.queue_target_seconds)))
        # A queue is real only when the rate does not need the window: a full window also delays the pong (it
        # waits for window credit like any byte of the channel), which is no reason to shrink.
        if latest > base + self.queue_target_seconds and fitting < 0.6 * self.window:
            if not may_shrink:
                return self.window
            self.window = max(fitting, self.window // 2)
        elif rate * base >= 0.6 * self.window:  # the window, not the link, limits the rate
            self.window = min(self.maximum_bytes, self.window * 4)  # a second of a long fat path is worth a lot
        return self.window
