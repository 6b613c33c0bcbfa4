"""A long emulated path (150 ms): a big print opens the kernel channel's window past its first size, a control request
is answered while that output is still arriving, and every byte of it arrives (bench_kernel's print, short)."""

from __future__ import annotations

import contextlib
import queue
import time
from typing import Any

import pytest

import relaykernel.relayed
from helpers import relay_config, running_kernel
from linkemu import LinkEmulator, through_link
from relaykernel.pacing import INITIAL_BYTES
from relaykernel.ssh.window import resize_receive_window

pytestmark = pytest.mark.usefixtures("no_ssh_agent")
MIB = 32  # at 150 ms a 2 MiB window alone would take about 2.5 s for this: the sizer has to open it
DEADLINE_SECONDS = 120.0


def test_a_big_print_opens_the_window_and_a_control_request_is_answered_meanwhile(topology, tmp_path, monkeypatch):
    applied: list[tuple[Any, int]] = []  # every window the link set on the kernel's channel

    def resize(channel: Any, size_bytes: int) -> None:
        resize_receive_window(channel, size_bytes)
        applied.append((channel, size_bytes))

    monkeypatch.setattr(relaykernel.relayed, "resize_receive_window", resize)
    with LinkEmulator(topology.relay_port, delay_ms=75) as emulator:
        laptop = through_link(topology, emulator, tmp_path / "laptop")
        with running_kernel(tmp_path, relay_config(laptop, tmp_path)) as (km, client):
            received, answered_at, idle = print_asking_control_meanwhile(client, MIB)
            assert idle, f"the print did not end within {DEADLINE_SECONDS:.0f} s ({received} bytes arrived)"
            assert received == MIB << 20, "every printed byte arrives, once"
            assert answered_at is not None and answered_at < MIB << 20, (
                f"the control reply came only after the output ({answered_at} of {MIB << 20} bytes)")
            assert max(size for _, size in applied) > INITIAL_BYTES, f"the window stayed at {INITIAL_BYTES} bytes"
            channel, size = applied[-1]
            assert channel.in_window_size == size, "the channel's window is the one the link set last"
            assert client.get_shell_msg(timeout=30)["content"]["status"] == "ok"


def print_asking_control_meanwhile(client: Any, mib: int) -> tuple[int, int | None, bool]:
    """Print ``mib`` MiB; once its output flows, send a kernel_info request on control. The bytes that arrived, how
    many had when the control reply came (None: it never did), and whether the cell ended in time."""
    code = f"_c = 'x' * (1 << 20)\nfor _ in range({mib}):\n    print(_c, end='', flush=True)\ndel _c"
    execute_id = client.execute(code)
    received, control_id, answered_at, idle = 0, None, None, False
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not idle and time.monotonic() < deadline:
        if control_id is None and received:
            request = client.session.msg("kernel_info_request")
            client.control_channel.send(request)
            control_id = request["header"]["msg_id"]
        elif control_id is not None and answered_at is None:
            with contextlib.suppress(queue.Empty):
                reply = client.get_control_msg(timeout=0)
                assert reply["parent_header"]["msg_id"] == control_id
                answered_at = received
        try:
            message = client.get_iopub_msg(timeout=0.02)
        except queue.Empty:
            continue
        if message["parent_header"].get("msg_id") != execute_id:
            continue
        if message["msg_type"] == "stream":
            received += len(message["content"]["text"])
        idle = message["msg_type"] == "status" and message["content"]["execution_state"] == "idle"
    return received, answered_at, idle
