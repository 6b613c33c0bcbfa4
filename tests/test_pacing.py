"""The receive window follows the link: it grows while it limits the rate, shrinks when a queue builds."""

from __future__ import annotations

from relaykernel.pacing import MAXIMUM_BYTES, MINIMUM_BYTES, WindowSizer


def run(sizer: WindowSizer, *, base_rtt: float, rate: float, seconds: int) -> int:
    """A bulk transfer over a path of ``base_rtt`` and ``rate``: pings see the base first (idle), then the queue."""
    now = 0.0
    sizer.observe_rtt(base_rtt, now)
    for _ in range(seconds):
        now += 1.0
        queue_seconds = max(0.0, sizer.window - rate * base_rtt) / rate
        sizer.observe_rtt(base_rtt + queue_seconds, now)
        sizer.observe_bytes(int(min(rate, sizer.window / base_rtt)), now - 1.0)
        sizer.update(now)
    return sizer.window


def test_a_fast_short_path_keeps_a_window_that_fills_it() -> None:
    rate = 60e6  # loopback: no window limits the rate; at most the queue target of bytes waits ahead of replies
    window = run(WindowSizer(), base_rtt=0.0003, rate=rate, seconds=20)
    assert rate * 0.0003 < window <= 2 * rate * (0.0003 + 0.05)


def test_a_long_fat_path_grows_the_window_to_its_cap() -> None:
    assert run(WindowSizer(), base_rtt=0.15, rate=1e9, seconds=10) == MAXIMUM_BYTES


def test_a_slow_link_shrinks_it_toward_rate_times_round_trip() -> None:
    rate = 2.5e6  # 20 Mbit/s: a full window queues window / rate seconds ahead of every reply
    sizer = WindowSizer()
    window = run(sizer, base_rtt=0.05, rate=rate, seconds=20)
    assert MINIMUM_BYTES <= window <= 2 * rate * (0.05 + 0.05)
    assert sizer.window * 2 >= rate * 0.05, "never below what keeps the link busy"


def test_a_window_limited_long_path_grows_even_though_its_pongs_wait_for_window_credit() -> None:
    """When the window is full, the pong waits behind it for credit: its round trip is not a queue on the path."""
    sizer, now = WindowSizer(), 0.0
    sizer.observe_rtt(0.15, now)
    for _ in range(3):
        now += 1.0
        sizer.observe_rtt(0.30, now)  # one window of data ahead of it
        sizer.observe_bytes(int(sizer.window / 0.15), now - 1.0)  # window-limited: a window per round trip
        sizer.update(now)
    assert sizer.window == MAXIMUM_BYTES


def test_an_output_after_an_idle_spell_is_judged_by_its_own_rate() -> None:
    """Idle since the last sizing, then one window in the first round trip of an output: it grows at once."""
    sizer = WindowSizer()
    sizer.observe_rtt(0.15, 0.0)
    sizer.update(0.0)
    first = sizer.window
    sizer.observe_bytes(first, 5.0)  # the kernel starts printing five seconds later; a full window comes in
    assert sizer.update(5.1) == 4 * first


def test_one_early_packet_is_no_rate() -> None:
    sizer = WindowSizer()
    sizer.observe_rtt(0.05, 0.0)
    sizer.update(0.0)
    sizer.observe_bytes(32 * 1024, 5.0)
    assert sizer.update(5.001) == sizer.window == 2 * 1024 * 1024
