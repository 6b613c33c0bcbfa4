"""Fault benchmark: issue 10's link faults, idle and while a cell prints, on relaykernel through the provisioner.

For each fault, on a fresh topology and kernel with the link emulator on the laptop↔relay leg: lines lost of a cell
printing 300 numbered lines at 10 Hz, whether its execute_reply and final idle came, time from the link being back to
output flowing and to a working next cell, whether a variable set before the cut survived, laptop-leg connections
opened, bytes replayed (from the data plane's log) and peak memory of the client process and of the VM's supervisor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jupyter_client import BlockingKernelClient

from bench_kernel import PORT_NAMES, WORKER_ENV, RelayKernelRun, install_relay_spec, run_in_own_session, sweep_vm
from bench_topology import PROFILES, across_link, open_sandbox
from faults import Blackhole, Fault, RelayDown, TunnelDown, VmLegHang, reset_laptop_leg, socket_inodes, tcp_connections
from linkemu import LinkEmulator
from relaykernel.sandbox.topology import LoopbackSandbox

LINES, LINE_HZ = 300, 10
PRINT_CELL = (f"import time\nfor _i in range(1, {LINES + 1}):\n    print(f'line {{_i}}', flush=True)\n"
              f"    time.sleep({1 / LINE_HZ})\n")
FAULT_AFTER_SECONDS = 5.0  # into the printing cell: about line 50
PROBE_SECONDS = 2.0  # one probe cell's wait for its answer before another is sent (issue 10: answers within 2 s)
GIVE_UP_SECONDS = 180.0  # after the link is back; then the figure is "never"
QUIET_SECONDS = 30.0  # a printing cell that sent nothing for this long after the link came back is given up on
REPLAYED = re.compile(r"replayed (\d+) bytes")  # hook: how the data plane is to log each replay
LINE = re.compile(r"^line (\d+)$")


class Instant(Fault):
    """A fault that is a single action (a reset): done at the start, nothing to undo."""

    def __init__(self, action: Callable[[], None]) -> None:
        super().__init__()
        self.action = action

    def _begin(self) -> None:
        self.action()

    def _finish(self) -> None:
        pass


@dataclass(frozen=True)
class FaultSpec:
    name: str
    label: str
    seconds: float  # how long it holds at --scale 1
    scaled: bool
    make: Callable[[LoopbackSandbox, LinkEmulator], Fault]


FAULTS = [
    FaultSpec("laptop-blackhole-10", "laptop leg blackholed 10 s", 10, True, lambda sb, link: Blackhole(link)),
    FaultSpec("laptop-blackhole-90", "laptop leg blackholed 90 s", 90, True, lambda sb, link: Blackhole(link)),
    FaultSpec("laptop-reset", "laptop leg reset", 0, False, lambda sb, link: Instant(lambda: reset_laptop_leg(link))),
    FaultSpec("vm-tunnel-10", "VM tunnel killed, back after 10 s", 10, True, lambda sb, link: TunnelDown(sb)),
    FaultSpec("relay-restart", "relay sshd restarted (sessions die)", 1, False, lambda sb, link: RelayDown(sb)),
    FaultSpec("vm-blackhole-90", "VM leg blackholed 90 s", 90, True, lambda sb, link: VmLegHang(sb)),
]
MODES = ("idle", "printing")


@dataclass
class Outcome:
    """What one fault did to one session."""

    fault: str
    mode: str
    held_s: float = 0.0
    lines_lost: int | None = None
    lines_repeated_or_out_of_order: int | None = None
    reply_arrived: bool | None = None
    idle_arrived: bool | None = None
    back_to_output_s: float | None = None
    back_to_working_cell_s: float | None = None
    probes_unanswered: int = 0
    variable_kept: bool | None = None
    kernel_alive: bool | None = None
    laptop_connections_opened: int = 0
    client_reconnects: int | None = None
    bytes_replayed: int | None = None
    peak_laptop_buffer_kib: float | None = None
    peak_client_rss_mib: float | None = None
    peak_supervisor_rss_mib: float | None = None
    error: str = ""


# ---- what is watched while a fault holds -----------------------------------------------------------------------


def rss_mib(pid: int | None) -> float | None:
    with contextlib.suppress(OSError, TypeError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def laptop_buffer(run: RelayKernelRun) -> Callable[[], int] | None:
    """Hook: what the laptop side holds for replay now (the stream link's buffered bytes), if it says."""
    assert run.km is not None
    link = getattr(getattr(run.km.provisioner, "relayed", None), "link", None)
    return getattr(link, "buffered_bytes", None)


def buffer_holder_on_vm(run: RelayKernelRun) -> int | None:
    """Hook: the VM process that would hold the replay buffer; today the kernel's parent, the supervisor."""
    assert run.km is not None
    kernel = run.km.provisioner.relayed.info().get("remote_pid")  # type: ignore[union-attr]
    with contextlib.suppress(OSError, TypeError, ValueError):
        return int(Path(f"/proc/{kernel}/stat").read_text().rpartition(")")[2].split()[1])
    return None


class Watch(logging.Handler):
    """Peak RSS of the client and the VM's supervisor and the client's connections to the kernel's local ports
    (sampled every 0.2 s), and the replays the data plane logs."""

    def __init__(self, supervisor: int | None, kernel_ports: set[int],
                 buffered: Callable[[], int] | None) -> None:
        super().__init__(logging.INFO)
        self.buffered = buffered
        self.peak_buffered: int | None = None
        self.pids = {"client": os.getpid(), "supervisor": supervisor}
        self.kernel_ports = kernel_ports
        self.first_connections = self._client_connections()
        self.connections = set(self.first_connections)
        self.peaks: dict[str, float | None] = {name: rss_mib(pid) for name, pid in self.pids.items()}
        self.replayed: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)

    def __enter__(self) -> Watch:
        logger = logging.getLogger("relaykernel")
        logger.addHandler(self)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.connections |= self._client_connections()
        logging.getLogger("relaykernel").removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        found = REPLAYED.search(record.getMessage())
        if found:
            self.replayed = (self.replayed or 0) + int(found[1])

    @property
    def reconnects(self) -> int:
        """Connections the client opened to the kernel's local ports since the watch began (0: it saw no cut)."""
        return len(self.connections - self.first_connections)

    def _client_connections(self) -> set[int]:
        """The socket (inode: a reconnect may reuse the port) of each client connection to the kernel's local ports."""
        table = tcp_connections()
        return {inode for inode in socket_inodes(os.getpid()) if table.get(inode, (0, 0))[1] in self.kernel_ports}

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.connections |= self._client_connections()
            if self.buffered is not None:
                self.peak_buffered = max(self.peak_buffered or 0, self.buffered())
            for name, pid in self.pids.items():
                now, peak = rss_mib(pid), self.peaks[name]
                if now is not None and (peak is None or now > peak):
                    self.peaks[name] = now


# ---- one scenario ----------------------------------------------------------------------------------------------


def answer_of(client: BlockingKernelClient, msg_id: str, timeout_seconds: float) -> tuple[str, str] | None:
    """(status, text/plain result) of the cell ``msg_id``, or None if its reply and result did not both come."""
    deadline, status, result = time.monotonic() + timeout_seconds, None, ""
    while time.monotonic() < deadline and status is None:
        with contextlib.suppress(queue.Empty):
            reply = client.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                status = reply["content"]["status"]
    while status == "ok" and not result and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            message = client.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            if message["parent_header"].get("msg_id") == msg_id and message["msg_type"] == "execute_result":
                result = message["content"]["data"].get("text/plain", "")
    return (status, result) if status == "error" or result else None


def working_cell(client: BlockingKernelClient, since: float, outcome: Outcome) -> None:
    """Send ``x`` until a cell answers; time it from ``since`` (the link back) and see whether x is still 41."""
    while time.monotonic() < since + GIVE_UP_SECONDS:
        answer = answer_of(client, client.execute("x"), PROBE_SECONDS)
        if answer is None:
            outcome.probes_unanswered += 1
        else:
            outcome.back_to_working_cell_s = time.monotonic() - since
            outcome.variable_kept = answer == ("ok", "41")
            return


class FaultClock:
    """The fault, held in a thread of its own for ``seconds`` after ``after`` seconds; records when the link is back."""

    def __init__(self, fault: Fault, after: float, seconds: float) -> None:
        self.fault, self.after, self.seconds = fault, after, seconds
        self.back_at: float | None = None
        self.error = ""
        self.thread = threading.Thread(target=self._run, name="bench-fault")

    def _run(self) -> None:
        try:
            time.sleep(self.after)
            with self.fault:
                time.sleep(self.seconds)
        except Exception as error:  # noqa: BLE001 - reported in the table, the run goes on
            self.error = f"the fault failed: {error}"
        finally:
            self.back_at = time.monotonic()


def watch_printing(client: BlockingKernelClient, msg_id: str, clock: FaultClock, outcome: Outcome) -> None:
    """Collect the printing cell's lines, reply and idle until it ends or goes quiet after the link is back."""
    numbers: list[int] = []
    last_message = started = time.monotonic()
    while not outcome.idle_arrived:
        now = time.monotonic()
        back = clock.back_at
        if back is not None and now - max(back, last_message) > QUIET_SECONDS and now > started + LINES / LINE_HZ:
            break
        with contextlib.suppress(queue.Empty):
            message = client.get_iopub_msg(timeout=0.5)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            last_message = time.monotonic()
            if message["msg_type"] == "stream":
                numbers += [int(m[1]) for m in map(LINE.match, message["content"]["text"].splitlines()) if m]
                if back is not None and outcome.back_to_output_s is None:
                    outcome.back_to_output_s = last_message - back
            outcome.idle_arrived = message["msg_type"] == "status" and message["content"]["execution_state"] == "idle"
    outcome.reply_arrived = _replied(client, msg_id)
    outcome.lines_lost = len(set(range(1, LINES + 1)) - set(numbers))
    outcome.lines_repeated_or_out_of_order = sum(1 for a, b in zip(numbers, numbers[1:]) if b != a + 1)


def _replied(client: BlockingKernelClient, msg_id: str, timeout_seconds: float = 5.0) -> bool:
    """Whether the cell's execute_reply came (it may trail its idle a little: another channel)."""
    deadline = time.monotonic() + timeout_seconds
    with contextlib.suppress(queue.Empty):
        while time.monotonic() < deadline:
            if client.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))["parent_header"].get(
                    "msg_id") == msg_id:
                return True
    return False


def run_scenario(spec: FaultSpec, mode: str, args: argparse.Namespace) -> Outcome:
    held = spec.seconds * args.scale if spec.scaled else spec.seconds
    outcome = Outcome(spec.name, mode, held)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rk-faults-")))
        sandbox, _ = open_sandbox(stack)
        laptop, link = across_link(stack, sandbox, PROFILES[args.profile], scratch)
        assert link is not None, "the fault benchmark needs the emulator on the laptop leg"
        remote_root, kernel_ids = f".rk-faults-{secrets.token_hex(4)}", list[str]()
        stack.callback(sweep_vm, sandbox.info, remote_root, kernel_ids)
        specs = install_relay_spec(scratch, laptop, remote_root, {"lease_seconds": args.lease_seconds})
        run = RelayKernelRun(specs, kernel_ids)
        stack.callback(run.stop)
        run.cold_start()
        assert run.client is not None and run.km is not None
        if answer_of(run.client, run.client.execute("x = 41; x"), 30) != ("ok", "41"):
            raise RuntimeError("the kernel did not answer before the fault")
        accepted = link.stats()["accepted"]
        # jupyter_client's heartbeat channel makes a new socket after every missed beat, by design: not counted
        ports = {int(run.km.get_connection_info()[name]) for name in PORT_NAMES if name != "hb_port"}
        with Watch(buffer_holder_on_vm(run), ports, laptop_buffer(run)) as watch:
            clock = FaultClock(spec.make(sandbox, link), FAULT_AFTER_SECONDS if mode == "printing" else 0, held)
            msg_id = run.client.execute(PRINT_CELL) if mode == "printing" else ""
            clock.thread.start()
            if mode == "printing":
                watch_printing(run.client, msg_id, clock, outcome)
            clock.thread.join()
            assert clock.back_at is not None
            working_cell(run.client, clock.back_at, outcome)
        outcome.error = clock.error
        outcome.kernel_alive = run.km.is_alive()
        outcome.laptop_connections_opened = link.stats()["accepted"] - accepted
        outcome.bytes_replayed = watch.replayed
        outcome.client_reconnects = watch.reconnects
        if watch.peak_buffered is not None:
            outcome.peak_laptop_buffer_kib = watch.peak_buffered / 1024
        outcome.peak_client_rss_mib, outcome.peak_supervisor_rss_mib = watch.peaks["client"], watch.peaks["supervisor"]
    return outcome


# ---- the report ------------------------------------------------------------------------------------------------


def cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


COLUMNS = [("held_s", "held s"), ("lines_lost", "lost"), ("lines_repeated_or_out_of_order", "disorder"),
           ("reply_arrived", "reply"), ("idle_arrived", "idle"), ("back_to_output_s", "back→out s"),
           ("back_to_working_cell_s", "back→cell s"), ("probes_unanswered", "unanswered"),
           ("variable_kept", "x kept"), ("kernel_alive", "alive"),
           ("laptop_connections_opened", "conns"), ("client_reconnects", "reconnects"), ("bytes_replayed", "replayed"),
           ("peak_laptop_buffer_kib", "buffer KiB"), ("peak_client_rss_mib", "client MiB"),
           ("peak_supervisor_rss_mib", "VM sup MiB")]


LEGEND = [
    "back→out: link back → the printing cell's next output. back→cell: link back → a new cell answers in full (for",
    "'printing', once that cell ended or went quiet); probe cells go every 2 s, unanswered: those that never did.",
    "conns: laptop-leg connections opened after the fault. reconnects: connections the client opened to the kernel's",
    "local ports but heartbeat's (0: the client saw no cut). replayed: bytes the data plane logged as replayed",
    "('—': none logged). buffer KiB: peak the laptop's stream link held for replay; MiB: peak RSS of the client",
    "process and of the VM's supervisor while the fault held and after.",
]


def render(outcomes: list[Outcome], args: argparse.Namespace) -> str:
    labels = {spec.name: spec.label for spec in FAULTS}
    link = PROFILES[args.profile].describe()
    lines = [f"relaykernel under link faults (provisioner + KernelManager), laptop leg {link}"
             f", lease {args.lease_seconds:g} s, durations × {args.scale:g}; printing = {LINES} lines at {LINE_HZ} Hz, "
             f"fault {FAULT_AFTER_SECONDS:g} s in",
             f"{'fault':<38}{'mode':<10}" + "".join(f"{title:>12}" for _, title in COLUMNS)]
    for outcome in outcomes:
        values = "".join(f"{cell(getattr(outcome, name)):>12}" for name, _ in COLUMNS)
        lines.append(f"{labels[outcome.fault]:<38}{outcome.mode:<10}{values}")
        if outcome.error:
            lines.append(f"    {outcome.error}")
    lines += ["", *LEGEND]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply fault durations (0.1: a short run)")
    parser.add_argument("--faults", default=",".join(spec.name for spec in FAULTS),
                        help=f"comma-separated, from: {', '.join(spec.name for spec in FAULTS)}")
    parser.add_argument("--modes", default=",".join(MODES), help="idle, printing or both")
    parser.add_argument("--profile", default="0", choices=[name for name in PROFILES if name != "direct"],
                        help="the laptop↔relay link (bench_kernel's profiles)")
    parser.add_argument("--lease-seconds", type=float, default=600.0, help="the kernel's lease (the default's)")
    parser.add_argument("--json", type=Path, help="also write the outcomes to this file")
    parser.add_argument("--log", action="store_true", help="relaykernel's log (INFO) on stderr, for what went wrong")
    args = parser.parse_args(argv)
    known = {spec.name for spec in FAULTS}
    args.faults = [name.strip() for name in args.faults.split(",") if name.strip()]
    args.modes = [name.strip() for name in args.modes.split(",") if name.strip()]
    if not set(args.faults) <= known or not set(args.modes) <= set(MODES) or args.scale <= 0:
        parser.error(f"--faults from {', '.join(sorted(known))}; --modes from {', '.join(MODES)}; --scale > 0")
    return args


def run_benchmark(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    os.environ.pop("SSH_AUTH_SOCK", None)
    if args.log:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    outcomes = []
    try:
        for spec in (spec for spec in FAULTS if spec.name in args.faults):
            for mode in args.modes:
                try:
                    outcomes.append(run_scenario(spec, mode, args))
                except Exception as error:  # noqa: BLE001 - one broken scenario must not hide the others
                    outcomes.append(Outcome(spec.name, mode, error=f"scenario failed: {error!r}"))
                print(f"{spec.name} {mode}: {outcomes[-1]}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted: everything the benchmark started has been stopped", file=sys.stderr)
        return 130
    print(render(outcomes, args))
    if args.json:
        args.json.write_text(json.dumps([asdict(outcome) for outcome in outcomes], indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get(WORKER_ENV) != "1":
        return run_in_own_session(sys.argv[1:] if argv is None else argv, Path(__file__))
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
