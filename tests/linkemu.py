"""A userspace WAN for the laptop↔relay leg: one-way delay, per-direction rate, blackhole and reset, as a TCP proxy.

Run on its own (``python tests/linkemu.py --upstream 127.0.0.1:PORT --delay-ms 25 --up-mbit 20``; SIGUSR1 blackholes,
SIGUSR2 ends it, SIGHUP resets every connection) or through :class:`LinkEmulator`, which starts that process and drives
it over a unix control socket. Model: each direction has one token bucket shared by all connections, then a one-way
delay line per connection (order kept, bounded: reading stops while it is full), and a new connection reaches the
upstream one round trip after it was accepted. A blackhole holds every byte (nothing is lost, as TCP would retransmit);
what was in flight or sent meanwhile arrives one delay after it ends. Limits: TCP ends at each side, so no slow start,
loss or retransmission timeout is emulated, and an idealised fair queue replaces a router's FIFO.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

LOOPBACK = "127.0.0.1"
MAX_SEGMENT = 65536
MIN_SEGMENT = 4096
CONNECT_TIMEOUT_SECONDS = 10.0
READY_TIMEOUT_SECONDS = 10.0
COMMAND_TIMEOUT_SECONDS = 5.0
LOOKAHEAD_SECONDS = 0.01  # how far ahead of the link a reader may reserve: the most a reply waits behind bulk


class TokenBucket:
    """A link's serialiser: bytes leave at ``mbit`` (None: at once), in arrival order across connections."""

    def __init__(self, mbit: float | None, burst_seconds: float = 0.002) -> None:
        self.rate = None if mbit is None else mbit * 1e6 / 8  # bytes per second
        self.burst_seconds = burst_seconds
        self.next_free = 0.0

    def segment(self) -> int:
        """How much to read at once: about 2 ms of the link, so a small reply never waits long behind bulk."""
        return MAX_SEGMENT if self.rate is None else int(min(MAX_SEGMENT, max(MIN_SEGMENT, self.rate * 0.002)))

    def reserve(self, size: int, now: float) -> float:
        """The time at which ``size`` bytes reserved now have left the sender."""
        if self.rate is None:
            return now
        start = max(now - self.burst_seconds, self.next_free)
        self.next_free = start + size / self.rate
        return max(now, self.next_free)


@dataclass
class Link:
    """What all connections share: the delay, one bucket per direction, the blackhole switch and the counters."""

    delay: float
    up: TokenBucket
    down: TokenBucket
    queue_bytes: int
    is_open: asyncio.Event = field(default_factory=asyncio.Event)
    resumed_at: float = 0.0
    connections: set[Connection] = field(default_factory=set)
    accepted: int = 0
    delivered: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})

    def blackhole(self, on: bool) -> None:
        if on:
            self.is_open.clear()
        elif not self.is_open.is_set():
            self.resumed_at = time.monotonic()
            self.is_open.set()

    def due(self, sent: float, deliver: float) -> float:
        """When bytes sent at ``sent`` arrive: one delay later, or one delay after a blackhole they were caught in."""
        return max(deliver, self.resumed_at + self.delay) if sent < self.resumed_at else deliver

    def stats(self) -> dict[str, Any]:
        held = sum(pipe.held for conn in self.connections for pipe in conn.pipes)
        return {"accepted": self.accepted, "open": len(self.connections), "blackholed": not self.is_open.is_set(),
                "delivered_up": self.delivered["up"], "delivered_down": self.delivered["down"], "held_bytes": held}


class Pipe:
    """One direction of one connection: read, wait for the bucket, then the delay line (bounded), then write."""

    def __init__(self, link: Link, direction: str) -> None:
        self.link = link
        self.direction = direction
        self.bucket = link.up if direction == "up" else link.down
        self.items: collections.deque[tuple[float, float, bytes]] = collections.deque()
        self.held = 0
        self.changed = asyncio.Event()

    async def pump_in(self, reader: asyncio.StreamReader) -> None:
        while True:
            while self.held >= self.link.queue_bytes:
                await self._wait_change()
            data = await reader.read(min(self.bucket.segment(), self.link.queue_bytes - self.held))
            now = time.monotonic()
            sent = self.bucket.reserve(len(data), now)
            if sent - now > LOOKAHEAD_SECONDS:  # reserve a little ahead: a late wake-up then costs no rate
                await asyncio.sleep(sent - now - LOOKAHEAD_SECONDS)
            self.items.append((sent, sent + self.link.delay, data))
            self.held += len(data)
            self._notify()
            if not data:
                return

    async def pump_out(self, writer: asyncio.StreamWriter) -> None:
        while True:
            while not self.items:
                await self._wait_change()
            sent, deliver, data = self.items[0]
            await self._wait_until_due(sent, deliver)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            self.items.popleft()
            self.held -= len(data)
            self.link.delivered[self.direction] += len(data)
            self._notify()

    async def _wait_until_due(self, sent: float, deliver: float) -> None:
        while True:
            await self.link.is_open.wait()
            wait = self.link.due(sent, deliver) - time.monotonic()
            if wait <= 0 and self.link.is_open.is_set():
                return
            await asyncio.sleep(max(wait, 0.0))

    async def _wait_change(self) -> None:
        await self.changed.wait()
        self.changed.clear()

    def _notify(self) -> None:
        self.changed.set()


class Connection:
    """One proxied connection: its two pipes and the upstream connect, one round trip late."""

    def __init__(self, link: Link, upstream: tuple[str, int]) -> None:
        self.link = link
        self.upstream = upstream
        self.pipes = (Pipe(link, "up"), Pipe(link, "down"))
        self.writers: list[asyncio.StreamWriter] = []
        self.task: asyncio.Task[None] | None = None

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        up, down = self.pipes
        flows = [asyncio.ensure_future(up.pump_in(reader))]
        try:
            upstream_reader, upstream_writer = await self._connect_upstream()
            self.writers.append(upstream_writer)
            more = (up.pump_out(upstream_writer), down.pump_in(upstream_reader), down.pump_out(writer))
            flows += [asyncio.ensure_future(flow) for flow in more]
            await asyncio.gather(*flows)
        except (OSError, asyncio.TimeoutError):
            self.abort()
        finally:
            for flow in flows:  # one side failing leaves the others waiting: end them all
                flow.cancel()
            for each in self.writers:
                each.close()

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        await self.link.is_open.wait()
        await asyncio.sleep(2 * self.link.delay)
        await self.link.is_open.wait()
        host, port = self.upstream
        return await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_SECONDS)

    def abort(self) -> None:
        """Close both ends at once with a reset, as a dropped NAT mapping or a killed transport would."""
        for each in self.writers:
            each.transport.abort()
        if self.task is not None:
            self.task.cancel()


class LinkServer:
    """The proxy's listener and control socket, in one event loop."""

    def __init__(self, link: Link, upstream: tuple[str, int]) -> None:
        self.link = link
        self.upstream = upstream
        self.stopped = asyncio.Event()

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(self.link, self.upstream)
        connection.task = asyncio.current_task()  # type: ignore[assignment]
        self.link.connections.add(connection)
        self.link.accepted += 1
        try:
            await connection.run(reader, writer)
        except asyncio.CancelledError:
            pass
        finally:
            self.link.connections.discard(connection)

    def command(self, line: str) -> str:
        words = line.split()
        if words == ["blackhole", "on"] or words == ["blackhole", "off"]:
            self.link.blackhole(words[1] == "on")
        elif words == ["reset"]:
            for connection in list(self.link.connections):
                connection.abort()
        elif words == ["stats"]:
            return json.dumps(self.link.stats())
        elif words == ["quit"]:
            self.stopped.set()
        else:
            return f"error: unknown command {line.strip()!r}"
        return "ok"

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while line := (await reader.readline()).decode():
                writer.write(self.command(line).encode() + b"\n")
                await writer.drain()
        writer.close()


async def serve(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    link = Link(args.delay_ms / 1000, TokenBucket(args.up_mbit), TokenBucket(args.down_mbit), args.queue_kib * 1024)
    link.blackhole(False)
    server = LinkServer(link, (host or LOOPBACK, int(port)))
    listener = await asyncio.start_server(server.accept, args.listen_host, args.listen_port)
    control = await asyncio.start_unix_server(server.control, args.control) if args.control else None
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(quiet_cancellations)
    handlers = {signal.SIGUSR1: "blackhole on", signal.SIGUSR2: "blackhole off", signal.SIGHUP: "reset",
                signal.SIGTERM: "quit", signal.SIGINT: "quit"}
    for signum, line in handlers.items():
        loop.add_signal_handler(signum, server.command, line)
    print(json.dumps({"port": listener.sockets[0].getsockname()[1]}), flush=True)
    await server.stopped.wait()
    listener.close()
    if control is not None:
        control.close()
    tasks = [connection.task for connection in server.link.connections if connection.task is not None]
    server.command("reset")
    if tasks:
        await asyncio.wait(tasks, timeout=CONNECT_TIMEOUT_SECONDS)


def quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A connection cancelled by a reset before its handler ran is not an error worth a traceback."""
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to (the relay's sshd)")
    parser.add_argument("--listen-host", default=LOOPBACK)
    parser.add_argument("--listen-port", type=int, default=0, help="0: any free port (printed as JSON on start)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay; the round trip is twice this")
    parser.add_argument("--up-mbit", type=float, help="rate client→upstream, shared by all connections")
    parser.add_argument("--down-mbit", type=float, help="rate upstream→client, shared by all connections")
    parser.add_argument("--queue-kib", type=int, default=8192, help="bytes held per direction of a connection")
    parser.add_argument("--control", help="unix socket for: blackhole on|off, reset, stats, quit")
    return parser.parse_args(argv)


# ---- the handle tests and benchmarks use ------------------------------------------------------------------------


class LinkEmulator:
    """Start ``linkemu.py`` in its own process towards ``upstream_port``; switch it while it runs; stop it."""

    def __init__(self, upstream_port: int, *, delay_ms: float = 0.0, up_mbit: float | None = None,
                 down_mbit: float | None = None, queue_kib: int = 8192, upstream_host: str = LOOPBACK) -> None:
        self.argv = [sys.executable, str(Path(__file__).resolve()), "--upstream", f"{upstream_host}:{upstream_port}",
                     "--delay-ms", str(delay_ms), "--queue-kib", str(queue_kib)]
        for flag, value in (("--up-mbit", up_mbit), ("--down-mbit", down_mbit)):
            if value is not None:
                self.argv += [flag, str(value)]
        self.delay_ms = delay_ms
        self._process: subprocess.Popen[bytes] | None = None
        self._directory: Path | None = None
        self._port = 0

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the link emulator is not running: call start() first")
        return self._port

    def start(self) -> LinkEmulator:
        self._directory = Path(tempfile.mkdtemp(prefix="rk-linkemu-"))
        control = str(self._directory / "control")
        self._process = subprocess.Popen([*self.argv, "--control", control], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, start_new_session=True)
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], READY_TIMEOUT_SECONDS)
        line = self._process.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"the link emulator did not start within {READY_TIMEOUT_SECONDS:g} s: {self.argv}")
        self._port = int(json.loads(line)["port"])
        return self

    def blackhole(self, on: bool) -> None:
        """Stop (True) or resume (False) every byte in both directions; connections stay open."""
        self._command(f"blackhole {'on' if on else 'off'}")

    def reset(self) -> None:
        """Close every proxied connection at once, both ends (new connections still work)."""
        self._command("reset")

    def stats(self) -> dict[str, Any]:
        """Connections accepted and open, bytes delivered each way, bytes held, whether blackholed."""
        return dict(json.loads(self._command("stats")))

    def stop(self) -> None:
        """End the process and every connection through it; safe to call twice."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
            if self._process.stdout is not None:
                self._process.stdout.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
        self._port = 0

    def _command(self, line: str) -> str:
        assert self._directory is not None, "the link emulator is not running"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(COMMAND_TIMEOUT_SECONDS)
            conn.connect(str(self._directory / "control"))
            conn.sendall(line.encode() + b"\n")
            reply = conn.makefile("rb").readline().decode().strip()
        if reply.startswith("error"):
            raise RuntimeError(f"link emulator: {reply}")
        return reply

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def through_link(info: Any, emulator: LinkEmulator, directory: Path) -> Any:
    """A copy of a sandbox's SandboxInfo whose relay (alias and ``relay``) is reached through ``emulator``.

    Writes an ssh config and known_hosts of its own into ``directory``; the VM stays ProxyJump via the relay alias,
    so both OpenSSH and relaykernel cross the emulated leg. ``relay_port`` stays the relay sshd's own port.
    """
    from relaykernel.sandbox.keys import SshHost, write_lines, write_ssh_config

    directory.mkdir(parents=True, exist_ok=True)
    relay_pattern = f"[{LOOPBACK}]:{info.relay_port} "
    lines = Path(info.known_hosts_file).read_text().splitlines()
    relay_key = next(line[len(relay_pattern):] for line in lines if line.startswith(relay_pattern))
    known_hosts = write_lines(directory / "known_hosts", [*lines, f"[{LOOPBACK}]:{emulator.port} {relay_key}"])
    identity = Path(info.identity_file)
    vm_port = int(info.vm.rpartition(":")[2])
    hosts = [
        SshHost(info.relay_alias, LOOPBACK, emulator.port, info.relay_user, identity, known_hosts),
        SshHost(info.vm_alias, LOOPBACK, vm_port, info.vm_user, identity, known_hosts, info.relay_alias),
    ]
    config = write_ssh_config(directory / "ssh_config", hosts)
    relay = f"{info.relay_user}@{LOOPBACK}:{emulator.port}"
    return replace(info, relay=relay, ssh_config_file=str(config), known_hosts_file=str(known_hosts))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(parse_args()))
