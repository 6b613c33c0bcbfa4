"""How much upload may be in flight: the link's rate and base round trip, measured from the receiver's acks."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

FLOOR_BYTES = 8 << 10  # about a round trip of 1 Mbit/s at 50 ms: 16 KiB queued 80 ms more ahead of the kernel
QUEUE_SECONDS = 0.05  # the most queue allowed ahead of the kernel's messages
QUEUE_SHARE = 0.25  # of the base round trip: a message never waits more than a quarter of the path's own time
MIN_QUEUE_SECONDS = 0.01
LOCAL_RTT_SECONDS = 0.01  # below this the path is local: its queues are the CPUs', not a link's
_RATE_WINDOW_SECONDS = 1.0
_MIN_RTT_WINDOW_SECONDS = 10.0


class AckPacer:
    """Keep in flight about rate x (base round trip + queue target), never below floor_bytes.

    The queue target is a quarter of the base round trip, 10 to 50 ms (``queue_seconds``): the kernel's messages
    then take at most about 1.25 times their idle time while an upload runs. A local path (under 10 ms) gets 50 ms.

    Everything the laptop sends the VM shares one SSH connection: bytes in flight beyond what the link carries in one
    round trip only queue, ahead of the kernel's messages and the lease renewals. Each ack names the bytes the
    receiver has read so far; the time from a frame's send to its ack gives the round trip (the smallest in the last
    10 s is the base), and the bytes acked per elapsed time give the delivery rate (the largest in the last second).
    At first the limit is doubled (a start-up phase, so a long fat path fills in a few round trips), until the round
    trips of one round trip show a queue (even the smallest is beyond half the queue target over the base: one late
    ack is jitter, not a queue). From then on it holds at the target; a link that gets faster still shows it, as the
    bytes in flight then come back sooner than the target allows for.
    """

    def __init__(self, *, floor_bytes: int = FLOOR_BYTES, queue_seconds: float = QUEUE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.floor_bytes = floor_bytes
        self.queue_seconds = queue_seconds
        self._clock = clock
        self.sent = 0
        self.acked = 0
        self._acked_at = clock()
        # end offset, sent at, bytes acked then, when that ack came, when the acked frame was sent
        self._flight: deque[tuple[int, float, int, float, float]] = deque()
        self._acked_sent_at = self._acked_at
        self._rates: deque[tuple[float, float]] = deque()  # (at, bytes per second)
        self._min_rtt: tuple[float, float] | None = None  # (seconds, measured at)
        self._recent_rtts: deque[tuple[float, float]] = deque()  # (at, seconds) over about the last round trip
        self.starting = True

    @property
    def in_flight(self) -> int:
        return self.sent - self.acked

    @property
    def base_rtt_seconds(self) -> float | None:
        return None if self._min_rtt is None else self._min_rtt[0]

    @property
    def rate_bytes_per_second(self) -> float:
        return max((rate for _, rate in self._rates), default=0.0)

    def limit(self) -> int:
        """Bytes that may be in flight now."""
        rtt, rate = self.base_rtt_seconds, self.rate_bytes_per_second
        if rtt is None or rate <= 0:
            return self.floor_bytes
        gain = 2.0 if self.starting else 1.0
        return max(self.floor_bytes, int(gain * rate * (rtt + self.queue_target_seconds)))

    @property
    def queue_target_seconds(self) -> float:
        """How much queue the bytes in flight may build: a share of the base round trip, within limits.

        On a path of a few milliseconds (a LAN, loopback) the link is not what delays the acks, the CPUs along the
        way are: a share of the round trip would starve the upload there, so it gets the most.
        """
        rtt = self.base_rtt_seconds or 0.0
        if rtt < LOCAL_RTT_SECONDS:
            return self.queue_seconds
        return min(self.queue_seconds, max(MIN_QUEUE_SECONDS, QUEUE_SHARE * rtt))

    def room(self) -> int:
        return self.limit() - self.in_flight

    def on_send(self, count: int) -> None:
        now = self._clock()
        if self.sent == self.acked:
            self._acked_at = self._acked_sent_at = now  # idle until now: the next rate sample starts here
        self.sent += count
        self._flight.append((self.sent, now, self.acked, self._acked_at, self._acked_sent_at))

    def on_ack(self, total: int) -> None:
        now = self._clock()
        sample = None
        while self._flight and self._flight[0][0] <= total:
            sample = self._flight.popleft()
        self.acked = max(self.acked, total)
        self._acked_at = now
        if sample is None:
            return
        _, sent_at, acked_then, acked_then_at, acked_sent_at = sample
        self._acked_sent_at = sent_at
        rtt = now - sent_at
        if self._min_rtt is None or rtt <= self._min_rtt[0] or now - self._min_rtt[1] > _MIN_RTT_WINDOW_SECONDS:
            self._min_rtt = (rtt, now)
        self._recent_rtts.append((now, rtt))
        target = self.queue_target_seconds
        while now - self._recent_rtts[0][0] > self._min_rtt[0] + target and len(self._recent_rtts) > 1:
            self._recent_rtts.popleft()
        if min(seconds for _, seconds in self._recent_rtts) > self._min_rtt[0] + target / 2:
            self.starting = False  # a queue: the link is full
        elapsed = max(now - acked_then_at, sent_at - acked_sent_at, 1e-6)  # acks in a burst overstate nothing
        self._rates.append((now, (total - acked_then) / elapsed))
        while self._rates and now - self._rates[0][0] > _RATE_WINDOW_SECONDS and len(self._rates) > 1:
            self._rates.popleft()

    def frame_bytes(self) -> int:
        """A frame size that gives several acks per round trip: an eighth of the limit, 2 KiB to 1 MiB (a frame's
        own send time counts in the round trip it measures: 4 KiB are 33 ms at 1 Mbit/s)."""
        return min(1 << 20, max(2 << 10, self.limit() // 8))
