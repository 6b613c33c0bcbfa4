"""Resize a channel's receive window while it runs: the one place that reaches into paramiko's window counters."""

from __future__ import annotations

import contextlib

import paramiko
from paramiko.common import cMSG_CHANNEL_WINDOW_ADJUST


def resize_receive_window(channel: paramiko.Channel, size_bytes: int) -> None:
    """Grow at once (a WINDOW_ADJUST for the difference) or shrink by withholding the next grants.

    SSH has no way to take a grant back: a smaller window takes effect as the peer's bytes already allowed are
    read, so the queue ahead of replies shrinks within about one round trip.
    """
    with channel.lock:
        if channel.closed or not channel.active:
            return
        change = size_bytes - channel.in_window_size
        channel.in_window_size = size_bytes
        channel.in_window_threshold = size_bytes // 10
        if change < 0:
            channel.in_window_sofar += change  # later reads are granted back only past this debt
            return
    if change > 0:
        message = paramiko.Message()
        message.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
        message.add_int(channel.remote_chanid)
        message.add_int(change)
        with contextlib.suppress(paramiko.SSHException, OSError, EOFError):  # the link is going: the next starts afresh
            channel.transport._send_user_message(message)
