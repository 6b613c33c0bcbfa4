"""The supervisor's one loop: line peers, the control socket, the streams, signals, the kernel and the lease."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from typing import Callable

from ...common.protocol import PROTOCOL_VERSION
from ...common.reactor import Reactor
from .kernel import signal_group, stop_kernel
from .lines import LinePeer
from .protocol import EXIT_OK, MAX_LINE_BYTES, error_event, utc_now
from .rundir import RunDir, log, stop_logging
from .streams import KernelStreams, Transport

MAX_WAIT_SECONDS = 0.25
DRAIN_SECONDS = 2.0
DEFAULT_BUFFER_BYTES = 64 * 1024 * 1024


class KernelSupervisor:
    """Serves control lines and streams until the kernel ends, the lease runs out, or SIGTERM."""

    def __init__(self, request: dict, kernel: subprocess.Popen, ports: dict, run_dir: RunDir) -> None:
        self.kernel, self.ports, self.run_dir = kernel, ports, run_dir
        self.lease_seconds = float(request["lease_seconds"])
        self.lease_deadline = time.monotonic() + self.lease_seconds
        self.reactor = Reactor()
        self.peers: list[LinePeer] = []
        self.streams: KernelStreams | None = None
        self.end_reason: str | None = None
        self.ops: dict[str, Callable[[dict], dict | None]] = {
            "renew": self.op_renew, "signal": self.op_signal, "status": self.op_status, "peek": self.op_status,
            "shutdown": self.op_shutdown,
        }

    def lease_left(self) -> float:
        return round(max(0.0, self.lease_deadline - time.monotonic()), 3)

    def renew(self) -> None:
        self.lease_deadline = time.monotonic() + self.lease_seconds

    # ---- line peers

    def open_peer(self, peer: LinePeer, leftover: bytes = b"") -> None:
        self.peers.append(peer)
        self.reactor.set(peer.read_fd, lambda: self.on_peer_readable(peer))
        self.handle_data(peer, leftover)

    def close_peer(self, peer: LinePeer) -> None:
        self.reactor.forget(peer.read_fd)
        if peer in self.peers:
            self.peers.remove(peer)
        peer.close()
        log.info("%s: closed by the peer; the kernel stays up under the lease", peer.name)

    def on_peer_readable(self, peer: LinePeer) -> None:
        try:
            data = os.read(peer.read_fd, MAX_LINE_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close_peer(peer)
            return
        self.handle_data(peer, data)

    def handle_data(self, peer: LinePeer, data: bytes) -> None:
        peer.feed(data)
        while (line := peer.next_line()) is not None:
            message = _parse(line)
            if message.get("op") == "mux":
                rest, peer.pending = peer.pending, b""
                self.switch_to_streams(peer, message, rest)
                return
            self.handle_message(message, peer.send, line)

    def handle_message(self, message: dict, reply: Callable[[dict], None], line: bytes = b"") -> None:
        if message.get("op") != "peek":
            self.renew()
        handler = self.ops.get(str(message.get("op")))
        if handler is None:
            ops = ", ".join(sorted(self.ops))
            text = (line or json.dumps(message).encode())[:200].decode(errors="replace")
            reply(error_event("request", f"not a known control line: {text}; ops are {ops}"))
            return
        answer = handler(message)
        if answer is not None:
            reply(answer)

    def on_connection(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.setblocking(False)  # a peer that stops reading must not stall the loop
        self.open_peer(LinePeer(f"socket#{conn.fileno()}", conn.fileno(), conn.fileno(), conn))

    # ---- streams

    def switch_to_streams(self, peer: LinePeer, message: dict, leftover: bytes) -> None:
        """A peer asked for the streams: its channel carries frames from now on (see relaykernel.common.mux)."""
        self.reactor.forget(peer.read_fd)
        if peer in self.peers:
            self.peers.remove(peer)
        session = str(message.get("session", ""))
        resume = self.streams is not None and self.streams.session == session and bool(message.get("resume"))
        if not resume:
            if self.streams is not None:
                self.streams.close()
            limit = message.get("buffer_limit_bytes")
            self.streams = KernelStreams(
                self.reactor, self.ports, session=session,
                buffer_limit_bytes=int(limit) if isinstance(limit, int) and limit > 0 else DEFAULT_BUFFER_BYTES,
                on_activity=self.renew, on_control=self.on_stream_control,
            )
        self.renew()
        peer.send({"event": "mux", "resumed": resume, "protocol": PROTOCOL_VERSION})
        assert self.streams is not None
        self.streams.attach(Transport(peer.name, peer.read_fd, peer.write_fd, peer.conn), resume=resume,
                            leftover=leftover)

    def on_stream_control(self, message: dict) -> dict | None:
        replies: list[dict] = []
        self.handle_message(message, replies.append)
        return replies[0] if replies else None

    # ---- ops

    def op_renew(self, message: dict) -> dict:
        return {"event": "renewed", "lease_left_seconds": self.lease_left()}

    def op_signal(self, message: dict) -> dict:
        signum = message.get("signum")
        if not isinstance(signum, int) or signum not in signal.valid_signals():
            return error_event("request", f"signum {signum!r} is not a signal number")
        log.info("sending signal %d to the kernel's group", signum)
        signal_group(self.kernel.pid, signum)
        return {"event": "signalled", "signum": signum}

    def op_status(self, message: dict) -> dict:
        streams = self.streams
        return {"event": "status", "alive": self.kernel.poll() is None, "pid": self.kernel.pid, "ports": self.ports,
                "lease_left_seconds": self.lease_left(), "lease_seconds": self.lease_seconds,
                "buffered_bytes": streams.mux.buffered_bytes() if streams else 0,
                "replayed_bytes": streams.mux.resent_bytes if streams else 0}

    def op_shutdown(self, message: dict) -> None:
        log.info("shutdown requested")
        self.end_reason = self.end_reason or "shutdown"  # every peer gets "exited" when the kernel is down

    # ---- the loop

    def on_signal(self, wakeup_fd: int) -> None:
        for signum in os.read(wakeup_fd, 512):
            if signum == signal.SIGTERM:
                log.info("received SIGTERM; stopping the kernel")
                self.end_reason = self.end_reason or "terminated"
            elif signum == signal.SIGHUP:
                log.info("ignored SIGHUP")

    def check_kernel_and_lease(self) -> None:
        if self.end_reason is None and self.kernel.poll() is not None:
            log.info("kernel exited by itself with status %s", self.kernel.returncode)
            self.end_reason = "kernel"
        if self.end_reason is None and time.monotonic() >= self.lease_deadline:
            log.info("lease expired: nothing from the laptop for %g s", self.lease_seconds)
            self.end_reason = "lease"

    def loop(self) -> None:
        while self.end_reason is None:
            now = time.monotonic()
            if self.streams is not None:
                self.streams.tick(now)
            wait = min(MAX_WAIT_SECONDS, max(0.0, self.lease_deadline - now))
            self.reactor.run_once(wait)
            self.check_kernel_and_lease()

    def run(self, wakeup_fd: int, listener: socket.socket, channel: LinePeer, leftover: bytes) -> int:
        self.reactor.set(wakeup_fd, lambda: self.on_signal(wakeup_fd))
        self.reactor.set(listener.fileno(), lambda: self.on_connection(listener))
        try:
            self.open_peer(channel, leftover)
            self.loop()
        except Exception:
            log.exception("supervisor loop failed; stopping the kernel")
            raise
        finally:
            self.finish(listener)
        return EXIT_OK

    def finish(self, listener: socket.socket) -> None:
        why = self.end_reason or "failed"
        status = stop_kernel(self.kernel)
        exited = {"event": "exited", "status": status, "why": why}
        for peer in self.peers:
            peer.send(exited)
        if self.streams is not None:
            self.streams.send_control(exited)
            self.streams.flush(time.monotonic() + DRAIN_SECONDS)
            self.streams.close()
        self.run_dir.record_ending(ending_summary(why, status, self.lease_seconds))
        log.info("ended (%s); kernel status %s", why, status)
        for peer in self.peers:
            peer.close()
        listener.close()
        self.reactor.close()
        stop_logging()
        self.run_dir.remove()


def _parse(line: bytes) -> dict:
    try:
        message = json.loads(line)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def ending_summary(why: str, status: int, lease_seconds: float) -> str:
    at = utc_now()
    texts = {
        "kernel": f"kernel exited with status {status} at {at}",
        "shutdown": f"kernel shut down on request at {at} (status {status})",
        "lease": f"lease expired at {at} (nothing from the laptop for {lease_seconds:g} s); kernel status {status}",
        "terminated": f"supervisor got SIGTERM at {at}; kernel status {status}",
        "failed": f"supervisor failed at {at}; kernel status {status}",
    }
    return texts[why]
