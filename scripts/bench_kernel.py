"""Benchmark relaykernel against plain OpenSSH (ProxyJump + -L) on the test topology across emulated links."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import queue
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paramiko
from jupyter_client import BlockingKernelClient, KernelManager
from jupyter_client.kernelspec import KernelSpecManager

from bench_topology import DEFAULT_PROFILES, PROFILES, Profile, across_link, open_sandbox, parse_profiles
from relaykernel.kernelspec import build_kernel_json
from relaykernel.sandbox.ports import LOOPBACK, free_loopback_ports
from relaykernel.sandbox.processes import stop_process_tree
from relaykernel.sandbox.tools import find_tool
from relaykernel.sandbox.topology import SandboxInfo

WORKER_ENV = "RELAYKERNEL_BENCH_WORKER"
SPEC_NAME = "relaybench"
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")  # Jupyter's five
RELAYKERNEL, OPENSSH, RESUME_OFF, LOCAL = "relaykernel", "OpenSSH", "plain forwards", "local kernel"
ROUND_TRIPS, WAN_ROUND_TRIPS = 200, 40  # execute('1') samples on loopback / on an emulated WAN
RESEND_SECONDS = 0.1  # kernel_info is re-sent this often until answered: the wait is never quantised coarser
QUIET_SECONDS = 0.2
START_TIMEOUT_SECONDS = 60.0
EXECUTE_TIMEOUT_SECONDS = 300.0
SSH_EXIT_SECONDS = 10.0


@dataclass
class Sample:
    """One round of one contender: seconds to the first kernel_info reply, round trip seconds, output MB/s."""

    cold_start_s: float
    restart_s: float
    round_trip_s: float
    output_mb_per_s: float
    untimed_setup_s: float = 0.0  # OpenSSH: the ssh that writes the connection file before the timed start


@dataclass
class Row:
    """One line of a profile's table: medians for relaykernel and OpenSSH, their ratio and the issue's target."""

    label: str
    ours: float
    theirs: float | None
    digits: int
    target: str = "—"
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        return None if not self.theirs else self.ours / self.theirs


# ---- what both contenders are measured with --------------------------------------------------------------------


def wait_for_kernel_info(client: BlockingKernelClient, check_alive: Callable[[], None]) -> None:
    """Return when the first kernel_info_reply arrives (re-sent every RESEND_SECONDS; replies may be lost early)."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        client.kernel_info()
        with contextlib.suppress(queue.Empty):
            if client.get_shell_msg(timeout=RESEND_SECONDS)["msg_type"] == "kernel_info_reply":
                return
        check_alive()
    raise TimeoutError(f"no kernel_info reply within {START_TIMEOUT_SECONDS:g} s")


def settle(client: BlockingKernelClient) -> None:
    """Untimed: wait until iopub delivers too (its subscription connects late), then drain every queued message."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        client.kernel_info()
        try:
            client.get_iopub_msg(timeout=0.5)
            break
        except queue.Empty:
            if time.monotonic() > deadline:
                raise TimeoutError("iopub never delivered a message") from None
    for receive in (client.get_shell_msg, client.get_iopub_msg):
        with contextlib.suppress(queue.Empty):
            while True:
                receive(timeout=QUIET_SECONDS)


def timed_execute(client: BlockingKernelClient, code: str, hook: Callable[[dict[str, Any]], None]) -> float:
    """Seconds from sending execute_request until the kernel is idle again and the reply is in."""
    started = time.perf_counter()
    reply = client.execute_interactive(code, output_hook=hook, timeout=EXECUTE_TIMEOUT_SECONDS)
    elapsed = time.perf_counter() - started
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"{code!r} failed on the kernel: {reply['content']}")
    return elapsed


def round_trip_seconds(client: BlockingKernelClient, count: int = ROUND_TRIPS) -> float:
    """Median execute('1') round trip after a warm-up."""
    warmup = max(2, count // 10)
    times = [timed_execute(client, "1", _ignore) for _ in range(warmup + count)]
    return statistics.median(times[warmup:])


def output_mb_per_s(client: BlockingKernelClient, mib: int) -> float:
    """Print ``mib`` MiB in 1 MiB chunks; MB/s (10^6 bytes) from execute to idle, every byte checked in."""
    received = [0]

    def count(message: dict[str, Any]) -> None:
        if message["msg_type"] == "stream":
            received[0] += len(message["content"]["text"])

    code = f"_chunk = 'x' * (1 << 20)\nfor _ in range({mib}):\n    print(_chunk, end='', flush=True)\ndel _chunk"
    elapsed = timed_execute(client, code, count)
    if received[0] != mib << 20:
        raise RuntimeError(f"printed {mib << 20} bytes but {received[0]} arrived")
    return (mib << 20) / elapsed / 1e6


def _ignore(message: dict[str, Any]) -> None:
    """An output hook that drops the output (execute_interactive would print it)."""


# ---- relaykernel: jupyter_client with the relay kernelspec -----------------------------------------------------


def install_relay_spec(directory: Path, info: SandboxInfo, remote_root: str,
                       overrides: dict[str, Any] | None = None) -> KernelSpecManager:
    """A relay kernelspec for the topology's VM, seen by a KernelSpecManager of its own."""
    config: dict[str, Any] = {
        "host": info.vm_alias,
        "ssh_config_file": info.ssh_config_file,
        "remote_python": info.vm_python,
        "remote_workdir": f"~/{remote_root}/work",
        "lease_seconds": 60.0,  # a crashed benchmark leaves no kernel for long; renewals run at the default pace
        "sync_local_dir": "none",  # the baseline syncs nothing either
        **(overrides or {}),
    }
    spec_dir = directory / "kernels" / SPEC_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(build_kernel_json(display_name="bench", config=config)))
    return KernelSpecManager(kernel_dirs=[str(directory / "kernels")])


def install_local_spec(directory: Path, python: str) -> KernelSpecManager:
    """A plain local kernelspec running the VM's python here: the kernel's own boot time, with no link at all."""
    spec_dir = directory / "kernels" / SPEC_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "local",
            "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(directory / "kernels")])


class RelayKernelRun:
    """One round of relaykernel: a fresh KernelManager, started, restarted and shut down."""

    def __init__(self, specs: KernelSpecManager, kernel_ids: list[str]) -> None:
        self.specs = specs
        self.kernel_ids = kernel_ids  # for the final sweep of the VM
        self.km: KernelManager | None = None
        self.client: BlockingKernelClient | None = None

    def cold_start(self) -> float:
        started = time.perf_counter()
        self.km = KernelManager(kernel_name=SPEC_NAME, kernel_spec_manager=self.specs)
        self.km.start_kernel()
        self.client = self.km.client()
        self.client.start_channels()
        wait_for_kernel_info(self.client, self._check_alive)
        elapsed = time.perf_counter() - started
        self.kernel_ids.append(self.km.kernel_id)
        settle(self.client)
        return elapsed

    def restart(self) -> float:
        assert self.km is not None and self.client is not None
        started = time.perf_counter()
        self.km.restart_kernel()
        wait_for_kernel_info(self.client, self._check_alive)
        elapsed = time.perf_counter() - started
        settle(self.client)
        return elapsed

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
        if self.km is not None and self.km.has_kernel:
            self.km.shutdown_kernel(now=False)

    def _check_alive(self) -> None:
        if self.km is None or not self.km.is_alive():
            raise RuntimeError("the kernel died before answering kernel_info")


class PlainForwards:
    """The kernel's five ports over one plain direct-tcpip channel per connection of relaykernel's own SSH chain.

    relaykernel's previous data plane, kept here only to price resumability: same kernel, same chain, same run,
    without the streams (no numbering, no replay, no supervisor in the path). Bench-only; never shipped.
    """

    def __init__(self, chain: Any, remote_ports: dict[str, int]) -> None:
        self.chain, self.remote_ports = chain, remote_ports
        self.listeners: dict[str, socket.socket] = {}
        self.threads: list[threading.Thread] = []
        self.open: list[Any] = []
        self.stopping = threading.Event()

    def start(self) -> dict[str, int]:
        for name in PORT_NAMES:
            listener = socket.create_server((LOOPBACK, 0))
            self.listeners[name] = listener
            self._spawn(self._accept, listener, self.remote_ports[name])
        return {name: listener.getsockname()[1] for name, listener in self.listeners.items()}

    def stop(self) -> None:
        self.stopping.set()
        for listener in self.listeners.values():
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for end in self.open:
            with contextlib.suppress(OSError):
                end.close()
        for thread in self.threads:
            thread.join(5)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket, remote_port: int) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel = self.chain.open_forward(remote_port)
            self.open += [client, channel]
            self._spawn(self._pump, client.recv, channel.sendall)
            self._spawn(self._pump, channel.recv, client.sendall)

    @staticmethod
    def _pump(read: Callable[[int], bytes], write: Callable[[bytes], None]) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            while chunk := read(65536):
                write(chunk)


class PlainForwardRun(RelayKernelRun):
    """The same relaykernel kernel, its client connected through PlainForwards instead of the streams."""

    forwards: PlainForwards | None = None

    def cold_start(self) -> float:
        elapsed = super().cold_start()  # the kernel and its chain, as relaykernel starts them
        assert self.km is not None and self.client is not None
        self.client.stop_channels()
        self.client = self._plain_client()
        wait_for_kernel_info(self.client, self._check_alive)
        settle(self.client)
        return elapsed

    def restart(self) -> float:
        return float("nan")  # the same start as relaykernel's: only latency and throughput are compared

    def stop(self) -> None:
        super().stop()
        if self.forwards is not None:
            self.forwards.stop()

    def _plain_client(self) -> BlockingKernelClient:
        assert self.km is not None
        relayed = self.km.provisioner.relayed  # type: ignore[union-attr]
        self.forwards = PlainForwards(relayed.chain, {n: int(p) for n, p in relayed.remote.started["ports"].items()})
        ports = self.forwards.start()
        client = BlockingKernelClient()
        client.load_connection_info({"ip": LOOPBACK, "transport": "tcp", "key": self.km.session.key,
                                     "signature_scheme": self.km.session.signature_scheme, **ports})
        client.start_channels()
        return client


# ---- the baseline: plain OpenSSH, ProxyJump from the same ssh config -------------------------------------------


class OpenSSHRun:
    """One round of the baseline: ``ssh VM python3 -m ipykernel_launcher -f FILE`` and one ``ssh -N -L`` x5."""

    def __init__(self, info: SandboxInfo, remote_dir: str, logs: Path) -> None:
        self.info = info
        self.remote_file = f'"$HOME/{remote_dir}/kernel.json"'  # remote_dir is [.a-z0-9-/] only: no quoting issue
        self.remote_dir = remote_dir
        self.logs = logs
        ports = free_loopback_ports(2 * len(PORT_NAMES))
        self.remote_ports = dict(zip(PORT_NAMES, ports))
        self.local_ports = dict(zip(PORT_NAMES, ports[len(PORT_NAMES) :]))
        self.key = secrets.token_hex(32)
        self.ssh = [find_tool("ssh"), "-F", info.ssh_config_file]
        self.kernel: subprocess.Popen[bytes] | None = None
        self.forward: subprocess.Popen[bytes] | None = None
        self.client: BlockingKernelClient | None = None
        self.untimed_setup_s = 0.0

    def cold_start(self) -> float:
        self.untimed_setup_s = self._write_connection_file()
        started = time.perf_counter()
        self.kernel = self._launch_kernel()
        forward_argv = [*self.ssh, "-N", "-o", "ExitOnForwardFailure=yes", *self._forwards(), self.info.vm_alias]
        self.forward = self._spawn(forward_argv, "forward")
        self.client = BlockingKernelClient()
        self.client.load_connection_info({**self._connection(self.local_ports), "key": self.key})
        self.client.start_channels()
        wait_for_kernel_info(self.client, self._check_alive)
        elapsed = time.perf_counter() - started
        settle(self.client)
        return elapsed

    def restart(self) -> float:
        assert self.client is not None
        started = time.perf_counter()
        self._stop_kernel()
        self.kernel = self._launch_kernel()
        wait_for_kernel_info(self.client, self._check_alive)
        elapsed = time.perf_counter() - started
        settle(self.client)
        return elapsed

    def stop(self) -> None:
        if self.client is not None:
            if self.kernel is not None and self.kernel.poll() is None:
                self._stop_kernel()
            self.client.stop_channels()
        for process in (self.kernel, self.forward):
            if process is not None:
                stop_process_tree(process)

    def _connection(self, ports: dict[str, int]) -> dict[str, Any]:
        return {"ip": LOOPBACK, "transport": "tcp", "signature_scheme": "hmac-sha256", "kernel_name": "", **ports}

    def _write_connection_file(self) -> float:
        """Send the connection file (with the key) on ssh's stdin, never in argv; 0600 in a 0700 dir."""
        started = time.perf_counter()
        command = f'umask 077 && mkdir -p "$HOME/{self.remote_dir}" && cat > {self.remote_file}'
        content = json.dumps({**self._connection(self.remote_ports), "key": self.key}).encode()
        result = subprocess.run(
            [*self.ssh, self.info.vm_alias, command], input=content, capture_output=True, timeout=30, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"OpenSSH: writing the connection file failed: {result.stderr.decode().strip()}")
        return time.perf_counter() - started

    def _launch_kernel(self) -> subprocess.Popen[bytes]:
        python = shlex.quote(self.info.vm_python)
        command = f"exec {python} -m ipykernel_launcher -f {self.remote_file}"
        return self._spawn([*self.ssh, "-n", self.info.vm_alias, command], "kernel")

    def _forwards(self) -> list[str]:
        pairs = [(self.local_ports[name], self.remote_ports[name]) for name in PORT_NAMES]
        return [arg for here, there in pairs for arg in ("-L", f"{LOOPBACK}:{here}:{LOOPBACK}:{there}")]

    def _spawn(self, argv: list[str], role: str) -> subprocess.Popen[bytes]:
        with open(self.logs / f"openssh-{role}.log", "ab") as log:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def _stop_kernel(self) -> None:
        """Stop the remote kernel as jupyter_client would: shutdown_request, then its ssh session ends with it."""
        assert self.client is not None and self.kernel is not None
        self.client.shutdown()
        try:
            self.kernel.wait(timeout=SSH_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            pattern = shlex.quote(f"[{self.remote_dir[0]}]{self.remote_dir[1:]}/kernel.json")
            subprocess.run([*self.ssh, self.info.vm_alias, f"pkill -KILL -f {pattern}"], timeout=30, check=False)
            stop_process_tree(self.kernel)

    def _check_alive(self) -> None:
        for role, process in (("kernel", self.kernel), ("forward", self.forward)):
            if process is not None and process.poll() is not None:
                log = self.logs / f"openssh-{role}.log"
                raise RuntimeError(f"OpenSSH: the {role} ssh exited ({process.returncode}): {log.read_text()[-800:]}")


# ---- the run ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to run: rounds per contender, MiB to print, the links, and whether to price resumability."""

    rounds: int
    output_mib: int
    profiles: list[Profile]
    resume_cost: bool  # also run the same kernel through plain forwards (PlainForwards)

    def output_mib_for(self, profile: Profile) -> int:
        """On a rate-limited downlink print about 8 s worth: the rate is what is measured, not the size."""
        if profile.down_mbit is None:
            return self.output_mib
        return max(1, min(self.output_mib, int(profile.down_mbit * 1e6 / 8 * 8 / (1 << 20))))


def round_trips_for(profile: Profile) -> int:
    return ROUND_TRIPS if profile.rtt_ms == 0 else WAN_ROUND_TRIPS


def measure_round(contender: RelayKernelRun | OpenSSHRun, output_mib: int, round_trips: int) -> Sample:
    """Cold start, latency, output, restart; the contender is stopped whatever happens."""
    try:
        cold = contender.cold_start()
        assert contender.client is not None
        round_trip = round_trip_seconds(contender.client, round_trips)
        mb_per_s = output_mb_per_s(contender.client, output_mib)
        restart = contender.restart()
    finally:
        contender.stop()
    return Sample(cold, restart, round_trip, mb_per_s, getattr(contender, "untimed_setup_s", 0.0))


def sweep_vm(info: SandboxInfo, remote_root: str, kernel_ids: list[str]) -> None:
    """Kill anything this run left on the VM (there should be nothing: say so loudly) and remove its files."""
    for token in [remote_root, *kernel_ids]:
        regex = f"[{token[0]}]{token[1:]}"  # keeps the pgrep/pkill wrappers from matching themselves
        found = info.vm_run(["pgrep", "-af", regex]).stdout.strip()
        if found:
            print(f"warning: still running on the VM (killed now):\n{found}", file=sys.stderr)
            info.vm_run(["pkill", "-KILL", "-f", regex])
    paths = " ".join(f'"$HOME/{path}"' for path in [remote_root, *(f".relaykernel/run/{k}" for k in kernel_ids)])
    info.vm_run(["sh", "-c", f"rm -rf {paths}"])


def local_reference(scratch: Path, python: str, plan: Plan) -> list[Sample]:
    """The same rounds on a local kernel (the VM's python, here): its boot time is not the link's."""
    specs = install_local_spec(scratch / "local", python)
    samples = []
    for index in range(plan.rounds):
        samples.append(measure_round(RelayKernelRun(specs, []), plan.output_mib, ROUND_TRIPS))
        print(f"local {index + 1}/{plan.rounds}: {samples[-1]}", file=sys.stderr, flush=True)
    return samples


def run_profile(laptop: SandboxInfo, profile: Profile, plan: Plan, scratch: Path, remote_root: str,
                kernel_ids: list[str]) -> dict[str, list[Sample]]:
    """Every round of every contender across one link, interleaved (who goes first alternates)."""
    directory = scratch / f"profile-{profile.name}"
    spec = install_relay_spec(directory / "on", laptop, remote_root)
    names = [RELAYKERNEL, *([RESUME_OFF] if plan.resume_cost else []), OPENSSH]
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for index in range(plan.rounds):
        make: dict[str, Callable[[], RelayKernelRun | OpenSSHRun]] = {RELAYKERNEL: lambda: RelayKernelRun(spec,
                                                                                                           kernel_ids)}
        if plan.resume_cost:
            make[RESUME_OFF] = lambda: PlainForwardRun(spec, kernel_ids)
        remote = f"{remote_root}/openssh-{profile.name}-{index}"
        make[OPENSSH] = lambda remote=remote: OpenSSHRun(laptop, remote, scratch)
        for name in sorted(make, reverse=index % 2 == 1):
            sample = measure_round(make[name](), plan.output_mib_for(profile), round_trips_for(profile))
            samples[name].append(sample)
            print(f"[{profile.name}] round {index + 1}/{plan.rounds} {name}: {sample}", file=sys.stderr, flush=True)
    return samples


def collect(plan: Plan) -> dict[str, Any]:
    """The local reference, then each profile with the emulator on the laptop↔relay leg; all stopped on the way out."""
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rk-bench-")))
        sandbox, kind = open_sandbox(stack)
        info = sandbox.info
        remote_root, kernel_ids = f".rk-bench-{secrets.token_hex(4)}", []
        stack.callback(sweep_vm, info, remote_root, kernel_ids)
        local = local_reference(scratch, info.vm_python, plan)
        profiles = {}
        for profile in plan.profiles:
            with contextlib.ExitStack() as link:
                laptop, _ = across_link(link, sandbox, profile, scratch)
                profiles[profile.name] = run_profile(laptop, profile, plan, scratch, remote_root, kernel_ids)
        return {"machine": machine_info(kind, info), "local": local, "profiles": profiles}


def machine_info(kind: str, info: SandboxInfo) -> dict[str, Any]:
    ssh_version = subprocess.run([find_tool("ssh"), "-V"], capture_output=True, text=True, check=False)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "topology": kind,
        "openssh": ssh_version.stderr.strip(),
        "paramiko": paramiko.__version__,
        "python": platform.python_version(),
        "vm_python": info.vm_python,
        "first_import_s": first_import_seconds(),
    }


def first_import_seconds() -> float:
    """What a fresh Jupyter server pays once, on the first relay kernel: importing the provisioner (paramiko)."""
    code = "import time; t = time.perf_counter(); import relaykernel.provisioner; print(time.perf_counter() - t)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return float(result.stdout)


# ---- the report ------------------------------------------------------------------------------------------------


def median_of(samples: list[Sample], field: str) -> float:
    return statistics.median(getattr(sample, field) for sample in samples)


def in_round_trips(label: str, field: str, samples: dict[str, list[Sample]], local: list[Sample], rtt_s: float) -> Row:
    """Time ÷ RTT once the local kernel's own time for the same step is taken off: round trips plus every fixed cost
    (process starts, key exchange CPU) in RTT units; the slope rows count the round trips alone."""
    own = median_of(local, field)
    ours, theirs = ((median_of(samples[name], field) - own) / rtt_s for name in (RELAYKERNEL, OPENSSH))
    return Row(label, ours, theirs, 1)


def profile_rows(profile: Profile, samples: dict[str, list[Sample]], local: list[Sample], mib: int,
                 at_zero: dict[str, list[Sample]] | None = None) -> list[Row]:
    """The table of one profile: seconds, round trips, latency, throughput, and the cost of resumability
    (``at_zero``: the RTT 0 profile's samples, to tell a window-bound rate from a CPU-bound one)."""
    def row(label: str, field: str, scale: float, digits: int, names: tuple[str, str] = (RELAYKERNEL, OPENSSH)) -> Row:
        ours, theirs = (median_of(samples[name], field) * scale for name in names)
        return Row(label, ours, theirs, digits)

    wan, rtt_s = profile.rtt_ms > 0, profile.rtt_ms / 1000
    cold, restart = row("cold start → first kernel_info (s)", "cold_start_s", 1, 3), row(
        "restart → first kernel_info (s)", "restart_s", 1, 3)
    latency = row("execute('1') round trip (ms)", "round_trip_s", 1000, 2)
    output = row(f"{mib} MiB printed (MB/s)", "output_mb_per_s", 1, 2)
    cold.target, cold.met = "≤ 1.0×", (cold.ratio or 0) <= 1.0
    rows = [cold]
    if wan:
        rows.append(in_round_trips("  (time − local boot) ÷ RTT", "cold_start_s", samples, local, rtt_s))
    rows.append(restart)  # no "less local" view: a local restart waits out jupyter_client's shutdown, ours does not
    if not wan:
        latency.target, latency.met = "≤ 0.25×", (latency.ratio or 0) <= 0.25
    rows.append(latency)
    if profile.down_mbit is None:
        most = 3.0 if profile.rtt_ms >= 150 else 1.0
        output.target, output.met = f"≥ {most:g}×", (output.ratio or 0) >= most
    rows.append(output)
    if wan and profile.down_mbit is None and at_zero is not None:
        ours0, theirs0 = (median_of(at_zero[name], "output_mb_per_s") for name in (RELAYKERNEL, OPENSSH))
        rows.append(Row("  ÷ its own rate at RTT 0", output.ours / ours0, (output.theirs or 0) / theirs0, 2))
    if profile.down_mbit is not None:
        link_mb_per_s = profile.down_mbit / 8
        share = Row("  share of the link's rate", output.ours / link_mb_per_s, (output.theirs or 0) / link_mb_per_s, 2,
                    "≥ 0.95", output.ours / link_mb_per_s >= 0.95)
        rows.append(share)
    if RESUME_OFF in samples:
        rows.append(row("streams / plain forwards: execute('1') (ms)", "round_trip_s", 1000, 2,
                        (RELAYKERNEL, RESUME_OFF)))
        rows.append(row("streams / plain forwards: print (MB/s)", "output_mb_per_s", 1, 2, (RELAYKERNEL, RESUME_OFF)))
    return rows


def render_rows(rows: list[Row]) -> list[str]:
    lines = [f"{'metric':<42}{RELAYKERNEL:>12}{OPENSSH:>10}{'ratio':>9}{'target':>10}  result"]
    for row in rows:
        theirs = "—" if row.theirs is None else f"{row.theirs:.{row.digits}f}"
        ratio = "—" if row.ratio is None else f"{row.ratio:.2f}×"
        verdict = "—" if row.met is None else ("met" if row.met else "MISSED")
        lines.append(f"{row.label:<42}{row.ours:>12.{row.digits}f}{theirs:>10}{ratio:>9}{row.target:>10}  {verdict}")
    return lines


def render(results: dict[str, Any], plan: Plan) -> tuple[str, dict[str, list[Row]]]:
    machine, local = results["machine"], results["local"]
    lines = [
        f"relaykernel vs plain OpenSSH (ProxyJump + ssh -N -L), median of {plan.rounds} round(s) per profile",
        f"machine: nproc {machine['nproc']}, Python {machine['python']}; topology: {machine['topology']}",
        f"{machine['openssh']}; paramiko {machine['paramiko']}; VM python {machine['vm_python']}",
        "links: the emulator (tests/linkemu.py) on the laptop↔relay leg, for both contenders",
        f"local kernel (the VM's python here, no link): cold start {median_of(local, 'cold_start_s'):.3f} s, restart "
        f"{median_of(local, 'restart_s'):.3f} s, execute('1') {median_of(local, 'round_trip_s') * 1000:.2f} ms, "
        f"{plan.output_mib} MiB printed {median_of(local, 'output_mb_per_s'):.1f} MB/s",
    ]
    tables: dict[str, list[Row]] = {}
    for profile in plan.profiles:
        mib = plan.output_mib_for(profile)
        at_zero = next((results["profiles"][p.name] for p in plan.profiles if p.rtt_ms == 0 and not p.direct
                        and p.down_mbit is None and plan.output_mib_for(p) == mib), None)
        tables[profile.name] = rows = profile_rows(profile, results["profiles"][profile.name], local, mib, at_zero)
        lines += ["", f"== {profile.describe()} ({round_trips_for(profile)} round trips timed)", *render_rows(rows)]
    slopes = slope_rows(plan, results["profiles"])
    if slopes:
        tables["slope"] = slopes
        lines += ["", "== round trips per step: the slope of time over RTT across the links without a rate limit",
                  *render_rows(slopes)]
    lines += ["", *summary_table(plan, tables), "", *notes(results, plan)]
    return "\n".join(lines), tables


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares through (x, y): (slope, intercept)."""
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return slope, mean_y - slope * mean_x


def slope_rows(plan: Plan, samples: dict[str, dict[str, list[Sample]]]) -> list[Row]:
    """Round trips as issue 15 counts them (16.9 = (2.99 s − 1.30 s) ÷ 100 ms): how much a step grows per second of
    RTT. Fixed costs (the kernel's boot, process starts, key exchange CPU) fall out; each RTT on the step's path
    counts once. Needs two RTTs among the links without a rate limit."""
    plain = [p for p in plan.profiles if not p.direct and p.up_mbit is None and p.down_mbit is None]
    if len({p.rtt_ms for p in plain}) < 2:
        return []
    rows = []
    steps = (("cold start, round trips", "cold_start_s", 12), ("restart, round trips", "restart_s", 5))
    for label, field, most in steps:
        fits = [fit_line([(p.rtt_ms / 1000, median_of(samples[p.name][who], field)) for p in plain])
                for who in (RELAYKERNEL, OPENSSH)]
        (ours, fixed), (theirs, their_fixed) = fits
        rows.append(Row(label, ours, theirs, 1, f"≤ {most:g}", ours <= most))
        rows.append(Row("  fixed part: the fit at RTT 0 (s)", fixed, their_fixed, 3))
    return rows


def summary_table(plan: Plan, tables: dict[str, list[Row]]) -> list[str]:
    """One line per profile, as issue 15 tabulates them: relaykernel / OpenSSH for each figure."""
    picks = ("cold start", "restart", "execute('1')", "MiB printed")
    lines = [f"{'profile':<42}" + "".join(f"{pick + ' rk / OpenSSH':>30}" for pick in picks)]
    for profile in plan.profiles:
        rows = [next(r for r in tables[profile.name] if pick in r.label and not r.label.startswith(" ")) for pick in
                picks]
        cells = [f"{r.ours:.{r.digits}f} / {r.theirs:.{r.digits}f}" for r in rows]
        lines.append(f"{profile.describe():<42}" + "".join(f"{cell:>30}" for cell in cells))
    return lines


def notes(results: dict[str, Any], plan: Plan) -> list[str]:
    openssh_writes = [s.untimed_setup_s for samples in results["profiles"].values() for s in samples[OPENSSH]]
    lines = [
        "ratio = relaykernel / OpenSSH (for MB/s too). Times end at the first kernel_info reply. Round trips = the",
        "slope of a step's median time over RTT (least squares across the links without a rate limit), as issue 15",
        "counted its 16.9; (time − local) ÷ RTT also counts fixed costs. Rate-limited downlinks print less (about 8 s",
        "of the link). '÷ its own rate at RTT 0': the print's rate over the same contender's at RTT 0, where the",
        "machine's CPU is the limit; near 1, the window is not what limits the rate on that path.",
        f"Not counted: OpenSSH's connection-file write before its start, median {statistics.median(openssh_writes):.3f}"
        f" s (one more ssh through the relay); relaykernel's one-time import in a fresh process, "
        f"{results['machine']['first_import_s']:.3f} s.",
    ]
    if plan.resume_cost:
        lines.append("Cost of resumability: the same kernel and SSH chain with the client on plain direct-tcpip "
                     "forwards (no streams, no replay), in the same run; their ratio is the 'streams / plain' rows.")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per contender and profile; medians reported")
    parser.add_argument("--output-mib", type=int, default=64, help="MiB the kernel prints for the throughput row")
    parser.add_argument("--profiles", type=parse_profiles, default=parse_profiles(DEFAULT_PROFILES),
                        help=f"links to measure across, from: {', '.join(PROFILES)} (default {DEFAULT_PROFILES}); "
                        "'direct' is loopback without the emulator; names are the RTT in ms")
    parser.add_argument("--no-resume-cost", dest="resume_cost", action="store_false",
                        help="skip the contender that prices resumability (plain forwards over the same chain)")
    parser.add_argument("--json", type=Path, help="also write the samples and the tables to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.output_mib < 1:
        parser.error("--rounds and --output-mib must be at least 1")
    return args


def run_in_own_session(argv: list[str], script: Path = Path(__file__)) -> int:
    """Run the benchmark in a child in its own session and pass a Ctrl-C on once.

    A terminal's Ctrl-C goes to its whole process group: it would kill the topology's sshd and tunnels under the
    benchmark before it could shut its kernels down through them. In a session of its own, only we get it.
    """
    env = {**os.environ, WORKER_ENV: "1"}
    worker = subprocess.Popen([sys.executable, str(script.resolve()), *argv], env=env, start_new_session=True)
    passed_on = [False]

    def pass_on(signum: int, frame: object) -> None:
        if not passed_on[0] and worker.poll() is None:
            print("\nstopping kernels, ssh and the topology…", file=sys.stderr, flush=True)
            worker.send_signal(signal.SIGINT)
        passed_on[0] = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, pass_on)
    return worker.wait()


def run_benchmark(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    os.environ.pop("SSH_AUTH_SOCK", None)  # both contenders offer only the topology's key
    importlib.import_module("relaykernel.provisioner")  # every timed start finds it imported (import: own line)
    plan = Plan(args.rounds, args.output_mib, args.profiles, args.resume_cost)
    try:
        results = collect(plan)
    except KeyboardInterrupt:
        print("interrupted: everything the benchmark started has been stopped", file=sys.stderr)
        return 130
    report, tables = render(results, plan)
    print(report)
    if args.json:
        document = {
            "machine": results["machine"], "rounds": plan.rounds, "output_mib": plan.output_mib,
            "local": [asdict(s) for s in results["local"]],
            "profiles": {name: {"samples": {who: [asdict(s) for s in items] for who, items in samples.items()},
                                "rows": [asdict(row) for row in tables[name]]}
                         for name, samples in results["profiles"].items()},
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get(WORKER_ENV) != "1":
        return run_in_own_session(sys.argv[1:] if argv is None else argv)
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
