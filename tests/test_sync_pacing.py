"""Bulk sync never starves the kernel: the pacer's arithmetic, and a kernel answering across a slow emulated link
while a big save uploads."""

from __future__ import annotations

import hashlib
import os
import secrets
import time

import pytest

from helpers import execute, relay_config, running_kernel
from linkemu import LinkEmulator, through_link
from relaykernel.options import RelayOptions
from relaykernel.relayed import build_chain
from relaykernel.sync.ignore import LocalFile
from relaykernel.sync.pacing import FLOOR_BYTES, AckPacer
from relaykernel.sync.remote import Batch, RemoteTree
from test_sync import write

pytestmark = pytest.mark.usefixtures("no_ssh_agent")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_pacer_keeps_rate_times_base_rtt_plus_the_queue_target_in_flight():
    clock = Clock()
    pacer = AckPacer(clock=clock)
    assert pacer.limit() == FLOOR_BYTES, "nothing measured yet: the floor"
    pacer.on_send(64_000)
    clock.now = 0.1
    pacer.on_ack(64_000)  # 64 kB delivered in one 100 ms round trip: 640 kB/s
    assert pacer.base_rtt_seconds == pytest.approx(0.1)
    assert pacer.rate_bytes_per_second == pytest.approx(640_000)
    assert pacer.queue_target_seconds == pytest.approx(0.025), "a quarter of the base round trip"
    assert pacer.limit() == pytest.approx(2 * 640_000 * 0.125, rel=1e-6), "no queue yet: the limit doubles"
    pacer.on_send(192_000)
    clock.now = 0.4
    pacer.on_ack(256_000)  # the round trip grew to 300 ms: a queue; the link carried 640 kB/s
    assert pacer.base_rtt_seconds == pytest.approx(0.1)
    assert pacer.limit() == pytest.approx(640_000 * 0.125, rel=1e-6), "a queue shows: rate x (base RTT + 25 ms)"
    slow = AckPacer(clock=clock)
    slow.on_send(1_000)
    clock.now = 1.4
    slow.on_ack(1_000)
    assert slow.limit() == FLOOR_BYTES, "never below the floor"
    assert slow.queue_target_seconds == pytest.approx(0.05), "at most 50 ms of queue on a long path"
    local = AckPacer(clock=clock)
    local.on_send(100_000)
    clock.now += 0.002
    local.on_ack(100_000)
    assert local.queue_target_seconds == pytest.approx(0.05), "a local path's queues are the CPUs': the most"
    assert pacer.frame_bytes() <= pacer.limit(), "several acks per round trip"


class PinnedPacer(AckPacer):
    def limit(self) -> int:
        return FLOOR_BYTES  # every batch needs acks to go on


def test_acks_count_across_batches_on_one_receiver(topology, tmp_path):
    """Batch after batch on one receiver, each bigger than what may be in flight: every one waits for acks."""
    chain = build_chain(RelayOptions(**relay_config(topology, tmp_path)))
    chain.connect()
    root = f"rk-pace-{secrets.token_hex(4)}"
    remote = RemoteTree(chain, python_argv=[topology.vm_python], root=f"~/{root}", timeout_seconds=10.0)
    local = tmp_path / "p"
    try:
        remote.listing()  # the receiver is up; from now on only FLOOR_BYTES may be in flight
        remote.pacer = PinnedPacer()
        for index in range(3):
            write(local, f"b{index}.bin", os.urandom(300_000))
            file = LocalFile(f"b{index}.bin", 300_000, (local / f"b{index}.bin").stat().st_mtime_ns, 0o644)
            assert remote.apply(local, Batch([file]))["written"] == 1
        assert remote.pacer.acked == remote.pacer.sent > 900_000
    finally:
        remote.close()
        topology.vm_run(["rm", "-rf", root])
        chain.close()


def test_the_kernel_answers_while_a_big_save_uploads_over_a_slow_link(topology, tmp_path):
    """8 Mbit/s up, 20 ms round trip: a 4 MB save takes seconds; execute('1') is answered meanwhile, the save lands."""
    with LinkEmulator(topology.relay_port, delay_ms=10, up_mbit=8, down_mbit=50) as emulator:
        laptop = through_link(topology, emulator, tmp_path / "laptop")
        local = tmp_path / "project"
        local.mkdir()
        with running_kernel(tmp_path, relay_config(laptop, tmp_path, sync_local_dir=str(local))) as (km, client):
            mirror = km.provisioner.relayed.hooks[0].mirror
            assert mirror.ready.wait(60), "live sync never started"
            data = os.urandom(4_000_000)
            (local / "big.bin").write_bytes(data)
            answered_in_flight, deadline = 0, time.monotonic() + 90
            while "big.bin" not in mirror.sync.synced and time.monotonic() < deadline:
                out, reply = execute(client, "print(1)", timeout_seconds=30)
                assert (out.strip(), reply["status"]) == ("1", "ok")
                if mirror.remote.pacer.in_flight > 0 and "big.bin" not in mirror.sync.synced:
                    answered_in_flight += 1
            assert "big.bin" in mirror.sync.synced, "the save never arrived"
            assert answered_in_flight >= 1, "no reply came while the upload was in flight"
            assert not km.provisioner.relayed.keeper.is_down, "a busy link must not be declared down"
            code = "import hashlib; print(hashlib.sha256(open('big.bin', 'rb').read()).hexdigest())"
            assert execute(client, code)[0].strip() == hashlib.sha256(data).hexdigest()
