"""Benchmark relaykernel against plain OpenSSH (ProxyJump + -L) on the test topology: start, latency, output."""

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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paramiko
from jupyter_client import BlockingKernelClient, KernelManager
from jupyter_client.kernelspec import KernelSpecManager

from bench_topology import open_topology
from relaykernel.kernelspec import build_kernel_json
from relaykernel.sandbox.ports import LOOPBACK, free_loopback_ports
from relaykernel.sandbox.processes import stop_process_tree
from relaykernel.sandbox.tools import find_tool
from relaykernel.sandbox.topology import SandboxInfo

WORKER_ENV = "RELAYKERNEL_BENCH_WORKER"
SPEC_NAME = "relaybench"
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")  # Jupyter's five
RELAYKERNEL, OPENSSH = "relaykernel", "OpenSSH"
WARMUP_ROUND_TRIPS, ROUND_TRIPS = 20, 200
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


@dataclass(frozen=True)
class Metric:
    """A table row: which Sample field, how it is shown, and the issue's target for relaykernel / OpenSSH."""

    field: str
    label: str
    scale: float
    digits: int
    target: str = "—"
    meets: Callable[[float], bool] | None = None


def metrics(output_mib: int) -> list[Metric]:
    return [
        Metric("cold_start_s", "cold start → first kernel_info (s)", 1, 3, "≤ 1.0×", lambda r: r <= 1.0),
        Metric("restart_s", "restart → first kernel_info (s)", 1, 3),
        Metric("round_trip_s", "execute('1') round trip (ms)", 1000, 2, "≤ 0.25×", lambda r: r <= 0.25),
        Metric("output_mb_per_s", f"{output_mib} MiB printed (MB/s)", 1, 1, "≥ 1.0×", lambda r: r >= 1.0),
    ]


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


def round_trip_seconds(client: BlockingKernelClient) -> float:
    """Median execute('1') round trip after a warm-up."""
    times = [timed_execute(client, "1", _ignore) for _ in range(WARMUP_ROUND_TRIPS + ROUND_TRIPS)]
    return statistics.median(times[WARMUP_ROUND_TRIPS:])


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


def install_relay_spec(directory: Path, info: SandboxInfo, remote_root: str) -> KernelSpecManager:
    """A relay kernelspec for the topology's VM, seen by a KernelSpecManager of its own."""
    config = {
        "host": info.vm_alias,
        "ssh_config_file": info.ssh_config_file,
        "remote_python": info.vm_python,
        "remote_workdir": f"~/{remote_root}/work",
        "lease_seconds": 60.0,  # a crashed benchmark leaves no kernel for long; renewals run at the default pace
        "sync_local_dir": "none",  # the baseline syncs nothing either
    }
    spec_dir = directory / "kernels" / SPEC_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(build_kernel_json(display_name="bench", config=config)))
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
            raise RuntimeError("relaykernel: the kernel died before answering kernel_info")


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


def measure_round(contender: RelayKernelRun | OpenSSHRun, output_mib: int) -> Sample:
    """Cold start, latency, output, restart; the contender is stopped whatever happens."""
    try:
        cold = contender.cold_start()
        assert contender.client is not None
        round_trip = round_trip_seconds(contender.client)
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


def collect(rounds: int, output_mib: int) -> dict[str, Any]:
    """Run every round, interleaving the contenders; everything is stopped on the way out, whatever happens."""
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rk-bench-")))
        info, kind = open_topology(stack)
        remote_root, kernel_ids = f".rk-bench-{secrets.token_hex(4)}", []
        stack.callback(sweep_vm, info, remote_root, kernel_ids)
        specs = install_relay_spec(scratch, info, remote_root)
        samples: dict[str, list[Sample]] = {RELAYKERNEL: [], OPENSSH: []}
        for index in range(rounds):
            make = {
                RELAYKERNEL: lambda: RelayKernelRun(specs, kernel_ids),
                OPENSSH: lambda i=index: OpenSSHRun(info, f"{remote_root}/openssh-{i}", scratch),
            }
            for name in sorted(make, reverse=index % 2 == 1):  # alternate who goes first
                samples[name].append(measure_round(make[name](), output_mib))
                print(f"round {index + 1}/{rounds} {name}: {samples[name][-1]}", file=sys.stderr, flush=True)
        return {"machine": machine_info(kind, info), "samples": samples}


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


def summarise(results: dict[str, Any], output_mib: int) -> dict[str, Any]:
    """Medians per contender, ratios relaykernel / OpenSSH and the verdict on each target."""
    samples = results["samples"]
    summary: dict[str, Any] = {}
    for metric in metrics(output_mib):
        ours, theirs = (statistics.median(getattr(s, metric.field) for s in samples[n]) for n in (RELAYKERNEL, OPENSSH))
        ratio = ours / theirs
        met = None if metric.meets is None else metric.meets(ratio)
        summary[metric.field] = {RELAYKERNEL: ours, OPENSSH: theirs, "ratio": ratio, "target": metric.target,
                                 "met": met}
    summary["openssh_connection_file_write_s"] = statistics.median(s.untimed_setup_s for s in samples[OPENSSH])
    return summary


def render(results: dict[str, Any], summary: dict[str, Any], rounds: int, output_mib: int) -> str:
    machine = results["machine"]
    lines = [
        f"relaykernel vs plain OpenSSH (ProxyJump + ssh -N -L), median of {rounds} round(s)",
        f"machine: nproc {machine['nproc']}, Python {machine['python']}; topology: {machine['topology']}",
        f"{machine['openssh']}; paramiko {machine['paramiko']}; VM python {machine['vm_python']}",
        "",
        f"{'metric':<38}{RELAYKERNEL:>12}{OPENSSH:>10}{'ratio':>9}{'target':>10}  result",
    ]
    for metric in metrics(output_mib):
        row = summary[metric.field]
        values = [f"{row[n] * metric.scale:.{metric.digits}f}" for n in (RELAYKERNEL, OPENSSH)]
        verdict = "—" if row["met"] is None else ("met" if row["met"] else "MISSED")
        lines.append(f"{metric.label:<38}{values[0]:>12}{values[1]:>10}{row['ratio']:>8.2f}×{metric.target:>10}  "
                     f"{verdict}")
    lines += [
        "",
        "ratio = relaykernel / OpenSSH (for MB/s too). Times end at the first kernel_info reply.",
        f"Not counted: OpenSSH's connection-file write before its start, "
        f"{summary['openssh_connection_file_write_s']:.3f} s (one more ssh through the relay); relaykernel's "
        f"one-time import in a fresh process, {machine['first_import_s']:.3f} s.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per contender; medians are reported")
    parser.add_argument("--output-mib", type=int, default=64, help="MiB the kernel prints for the throughput row")
    parser.add_argument("--json", type=Path, help="also write the samples and the summary to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.output_mib < 1:
        parser.error("--rounds and --output-mib must be at least 1")
    return args


def run_in_own_session(argv: list[str]) -> int:
    """Run the benchmark in a child in its own session and pass a Ctrl-C on once.

    A terminal's Ctrl-C goes to its whole process group: it would kill the topology's sshd and tunnels under the
    benchmark before it could shut its kernels down through them. In a session of its own, only we get it.
    """
    env = {**os.environ, WORKER_ENV: "1"}
    worker = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], env=env, start_new_session=True)
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
    try:
        results = collect(args.rounds, args.output_mib)
    except KeyboardInterrupt:
        print("interrupted: everything the benchmark started has been stopped", file=sys.stderr)
        return 130
    summary = summarise(results, args.output_mib)
    print(render(results, summary, args.rounds, args.output_mib))
    if args.json:
        samples = {name: [asdict(s) for s in items] for name, items in results["samples"].items()}
        document = {"machine": results["machine"], "rounds": args.rounds, "output_mib": args.output_mib,
                    "samples": samples, "summary": summary}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get(WORKER_ENV) != "1":
        return run_in_own_session(sys.argv[1:] if argv is None else argv)
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
