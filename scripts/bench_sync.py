"""Benchmark the work-directory sync against rsync through the same relay, across emulated links, in one run.

Per link profile (RTT 0, 50, 150 ms; 50 ms at 20 Mbit/s; 50 ms with 1 Mbit/s up): the initial sync of 1000 files
against ``rsync -a -e ssh``; the initial sync onto a VM folder that already holds the same files from another source
(the hash path) against ``rsync -a --checksum``; save -> visible on the VM. On the rate-limited profiles also
``execute('1')`` while a big save uploads, against idle. Idle watcher CPU once, with no emulator.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from jupyter_client import KernelManager

from bench_kernel import SPEC_NAME, install_relay_spec, settle, timed_execute, wait_for_kernel_info
from bench_topology import DEFAULT_PROFILES, Profile, across_link, open_sandbox, parse_profiles
from relaykernel.options import RelayOptions
from relaykernel.relayed import build_chain
from relaykernel.sandbox.tools import find_tool
from relaykernel.sandbox.topology import LoopbackSandbox, SandboxInfo
from relaykernel.sync.engine import WorkdirSync
from relaykernel.sync.ignore import IgnoreRules
from relaykernel.sync.remote import RemoteTree

FILES = 1000
FULL_TREE_MB = 30.0
MAX_TRANSFER_SECONDS = 25.0  # a rate-limited profile gets a smaller tree, so one transfer takes about this long
LOAD_FILE_MB = {"50-20mbit": 24, "50-1mbit-up": 4}
# Issue 15's targets: at 20 Mbit/s up execute's median stays within 1.5x idle; at 1 Mbit/s up the save arrives and
# the kernel answers throughout (here: every execute within ANSWERED_WITHIN_SECONDS); on both the link is never
# declared down.
MEDIAN_RATIO_TARGET = {"50-20mbit": 1.5}
ANSWERED_WITHIN_SECONDS = 1.0
Measure = Callable[[SandboxInfo, Path, str], float]


def make_tree(root: Path, count: int, total_mb: float, seed: int = 7) -> int:
    """``count`` files of random sizes averaging total_mb / count, in nested folders; their total size."""
    rng, total, mean = random.Random(seed), 0, max(1024, int(total_mb * 1e6 / count))
    for index in range(count):
        path = root / f"d{index % 10}" / f"s{index % 7}" / f"f{index}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = rng.randint(max(1, mean // 4), 2 * mean - mean // 4)
        path.write_bytes(rng.randbytes(size))
        total += size
    return total


def tree_mb_for(profile: Profile) -> float:
    rate = min(v for v in (profile.up_mbit, profile.down_mbit, 1e9) if v)
    return min(FULL_TREE_MB, rate * 1e6 / 8 * MAX_TRANSFER_SECONDS / 1e6)


def options_for(info: SandboxInfo) -> RelayOptions:
    return RelayOptions(host=info.vm_alias, ssh_config_file=info.ssh_config_file, remote_python=info.vm_python,
                        command_timeout_seconds=60.0)


def relaykernel_initial(info: SandboxInfo, local: Path, remote_dir: str) -> float:
    """Seconds for a cold initial sync: connect through the relay, list (and hash where needed), send what differs."""
    started = time.perf_counter()
    options = options_for(info)
    chain = build_chain(options)
    try:
        chain.connect()
        remote = RemoteTree(chain, python_argv=options.python_argv(), root=remote_dir, timeout_seconds=60)
        report = WorkdirSync(local, remote, IgnoreRules(local)).initial()
        remote.close()
        if report.errors:
            raise RuntimeError(f"sync failed: {report.errors}")
    finally:
        chain.close()
    return time.perf_counter() - started


def rsync_initial(info: SandboxInfo, local: Path, remote_dir: str, *extra: str) -> float:
    """Seconds for ``rsync -a -e ssh`` of the same tree through the same relay (ProxyJump from the same config)."""
    started = time.perf_counter()
    ssh = f"{find_tool('ssh')} -F {info.ssh_config_file}"
    subprocess.run([find_tool("rsync"), "-a", *extra, "-e", ssh, f"{local}/", f"{info.vm_alias}:{remote_dir}/"],
                   check=True, capture_output=True, timeout=600)
    return time.perf_counter() - started


def latencies(info: SandboxInfo, local: Path, remote_dir: str, samples: int) -> list[float]:
    """Seconds from a local save to the file's arrival on the VM, seen by a poller on the VM (same clock)."""
    options = options_for(info)
    chain = build_chain(options)
    chain.connect()
    remote = RemoteTree(chain, python_argv=options.python_argv(), root=remote_dir, timeout_seconds=60)
    sync = WorkdirSync(local, remote, IgnoreRules(local))
    sync.initial()
    sync.watch()
    poller = info_popen(info, remote_dir, samples)
    try:
        time.sleep(0.5)
        written = []
        for index in range(samples):
            written.append(time.time())
            (local / f"latency-{index}.txt").write_text(f"save {index}\n")
            time.sleep(0.5)
        arrived = [float(x) for x in poller.communicate(timeout=120)[0].split()]
    finally:
        poller.kill()
        sync.stop()
        remote.close()
        chain.close()
    return sorted(a - w for a, w in zip(arrived, written))


def info_popen(info: SandboxInfo, remote_dir: str, count: int) -> subprocess.Popen[str]:
    code = ("import os, time\n"
            f"root = os.path.expanduser('~/{remote_dir}')\n"
            f"for i in range({count}):\n"
            "    path = os.path.join(root, f'latency-{i}.txt')\n"
            "    while not os.path.exists(path):\n"
            "        time.sleep(0.0005)\n"
            "    print(time.time(), flush=True)\n")
    prefix, env = [], dict(os.environ)
    if info.netns:
        import pwd

        account = pwd.getpwnam(info.vm_user)
        prefix = ["ip", "netns", "exec", info.netns, "setpriv", f"--reuid={account.pw_uid}",
                  f"--regid={account.pw_gid}", "--init-groups", "--"]
        env = {"HOME": account.pw_dir, "PATH": "/usr/bin:/bin"}
    return subprocess.Popen([*prefix, info.vm_python, "-c", code], stdout=subprocess.PIPE, text=True, env=env)


def execute_while_syncing(info: SandboxInfo, scratch: Path, remote_root: str, file_mb: int,
                          median_ratio_target: float | None) -> str:
    """execute('1') idle, then while a file_mb MB save in the kernel's folder uploads: medians, and the link; the
    verdict by ``median_ratio_target``, or (None) by every execute answered within ANSWERED_WITHIN_SECONDS."""
    local = scratch / "kernel-folder"
    local.mkdir(parents=True, exist_ok=True)
    specs = install_relay_spec(scratch / "spec", info, remote_root, {"sync_local_dir": str(local)})
    km = KernelManager(kernel_name=SPEC_NAME, kernel_spec_manager=specs)
    km.start_kernel()
    client = km.client()
    client.start_channels()
    try:
        wait_for_kernel_info(client, lambda: None)
        settle(client)
        relayed = km.provisioner.relayed  # type: ignore[union-attr]
        mirror = relayed.hooks[0].mirror
        if not mirror.ready.wait(120):
            return "the kernel's first sync never ended"
        idle = [timed_execute(client, "1", lambda _: None) for _ in range(20)][3:]
        (local / "big.bin").write_bytes(os.urandom(file_mb * 1_000_000))
        started, busy, link_lost = time.perf_counter(), [], False
        while "big.bin" not in mirror.sync.synced and time.perf_counter() - started < 600:
            busy.append(timed_execute(client, "1", lambda _: None))
            link_lost |= relayed.keeper is not None and relayed.keeper.is_down
        upload = time.perf_counter() - started
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=False)
    landed = "big.bin" in mirror.sync.synced
    busy_median = statistics.median(busy) if busy else float("nan")  # none: the save landed before one execute
    ratio = busy_median / statistics.median(idle)
    slowest = max(busy, default=float("nan"))
    if median_ratio_target is not None:
        target, met = f"median <= {median_ratio_target}x idle", ratio <= median_ratio_target
    else:
        target, met = f"every execute answered within {ANSWERED_WITHIN_SECONDS:g} s", slowest <= ANSWERED_WITHIN_SECONDS
    met = met and landed and not link_lost
    return (f"execute('1') idle median {statistics.median(idle) * 1000:.0f} ms; while a {file_mb} MB save uploads "
            f"({len(busy)} executes over {upload:.1f} s, {'big.bin arrived' if landed else 'big.bin NEVER arrived'}): "
            f"median {busy_median * 1000:.0f} ms, max {slowest * 1000:.0f} ms, ratio {ratio:.2f}x; "
            f"link declared down: {'yes' if link_lost else 'never'} (target: {target}, the save arrives, the link "
            f"never down) {'met' if met else 'MISSED'}")


def idle_cpu(info: SandboxInfo, local: Path, remote_dir: str, seconds: float) -> tuple[float, float]:
    """CPU seconds per minute of an idle watcher over the tree, and the seconds one full rescan takes."""
    options = options_for(info)
    chain = build_chain(options)
    chain.connect()
    try:
        remote = RemoteTree(chain, python_argv=options.python_argv(), root=remote_dir, timeout_seconds=120)
        sync = WorkdirSync(local, remote, IgnoreRules(local), rescan_seconds=3600)
        sync.initial()
        sync.watch()
        try:
            before = time.process_time()
            time.sleep(seconds)
            per_minute = (time.process_time() - before) * 60 / seconds
        finally:
            sync.stop()
        started = time.perf_counter()
        sync.rescan()
        remote.close()
        return per_minute, time.perf_counter() - started
    finally:
        chain.close()


def compare(info: SandboxInfo, tree: Path, rounds: int, name: str, ours: Measure, theirs: Measure,
            seed: str | None, prefix: str) -> list[float]:
    """Median seconds of relaykernel and of rsync over ``rounds``, each into a fresh folder (a copy of seed)."""
    results: dict[str, list[float]] = {"relaykernel": [], "rsync": []}
    for round_index in range(rounds):
        for tool, measure in (("relaykernel", ours), ("rsync", theirs)):
            target = f"{prefix}-{name}-{tool}-{round_index}"
            if seed:
                info.vm_run(["cp", "-r", seed, target])  # the same files, written by another source, new mtimes
            results[tool].append(measure(info, tree, target))
            info.vm_run(["rm", "-rf", target])
            print(f"  {name} round {round_index + 1} {tool}: {results[tool][-1]:.3f} s", file=sys.stderr, flush=True)
    return [statistics.median(results["relaykernel"]), statistics.median(results["rsync"])]


def verdict(ours: float, theirs: float) -> str:
    ratio = ours / theirs
    return f"relaykernel {ours:.3f} s, rsync {theirs:.3f} s, ratio {ratio:.2f}x {'met' if ratio <= 1.0 else 'MISSED'}"


def run_profile(sandbox: LoopbackSandbox, profile: Profile, scratch: Path, args: argparse.Namespace) -> list[str]:
    lines = [f"[{profile.describe()}]"]
    with contextlib.ExitStack() as stack:
        info, _ = across_link(stack, sandbox, profile, scratch)
        tree = scratch / f"tree-{profile.name}"
        total = make_tree(tree, FILES, tree_mb_for(profile))
        base = sandbox.info
        initial = compare(info, tree, args.rounds, "initial", relaykernel_initial, rsync_initial, None, args.prefix)
        lines.append(f"initial sync, {FILES} files, {total / 1e6:.1f} MB: {verdict(*initial)} (rsync -a)")
        rsync_initial(base, tree, f"{args.prefix}-seed")  # the seed is made on the VM without the emulated link
        hashed = compare(info, tree, args.rounds, "hash", relaykernel_initial,
                         lambda i, t, d: rsync_initial(i, t, d, "--checksum"), f"{args.prefix}-seed", args.prefix)
        base.vm_run(["rm", "-rf", f"{args.prefix}-seed"])
        lines.append(f"initial sync onto the same files from another source (hash path): {verdict(*hashed)} "
                     "(rsync -a --checksum)")
        live = scratch / f"live-{profile.name}"
        live.mkdir()
        waits = latencies(info, live, f"{args.prefix}-latency", args.samples)
        info.vm_run(["rm", "-rf", f"{args.prefix}-latency"])
        p50, p95 = waits[len(waits) // 2], waits[max(0, int(len(waits) * 0.95) - 1)]
        target = 0.150 + profile.rtt_ms / 1000
        lines.append(f"save -> visible, {len(waits)} saves: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms "
                     f"(target p50 <= 150 ms + 1 RTT = {target * 1000:.0f} ms) {'met' if p50 <= target else 'MISSED'}")
        if profile.name in LOAD_FILE_MB:
            lines.append(execute_while_syncing(info, scratch / f"load-{profile.name}", f"{args.prefix}-load",
                                               LOAD_FILE_MB[profile.name], MEDIAN_RATIO_TARGET.get(profile.name)))
            info.vm_run(["rm", "-rf", f"{args.prefix}-load"])
        shutil.rmtree(tree, ignore_errors=True)
    return lines


def run(args: argparse.Namespace) -> None:
    report: list[str] = []
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rk-bench-sync-")))
        sandbox, kind = open_sandbox(stack)
        report.append(f"relaykernel sync vs rsync, median of {args.rounds} round(s); topology: {kind}; "
                      f"nproc {os.cpu_count()}")
        for profile in args.profiles:
            print(f"profile {profile.describe()}", file=sys.stderr, flush=True)
            report += run_profile(sandbox, profile, scratch / profile.name, args)
        if args.idle_files:
            big = scratch / "idle"
            make_tree(big, args.idle_files, args.idle_files * 1500 / 1e6)
            cpu_per_minute, rescan_s = idle_cpu(sandbox.info, big, f"{args.prefix}-idle", args.idle_seconds)
            sandbox.info.vm_run(["rm", "-rf", f"{args.prefix}-idle"])
            report.append(f"idle watcher over {args.idle_files} files: {cpu_per_minute:.3f} CPU s per minute; one "
                          f"full rescan {rescan_s:.3f} s (every sync_rescan_seconds, 30 s by default)")
    print("\n".join(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profiles", type=parse_profiles, default=parse_profiles(DEFAULT_PROFILES),
                        help=f"link profiles, comma-separated (default {DEFAULT_PROFILES}; 'direct' skips the "
                        "emulator)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20, help="saves timed per profile")
    parser.add_argument("--idle-files", type=int, default=10000, help="0 skips the idle-CPU row")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    args = parser.parse_args()
    args.prefix = f"bench-sync-{secrets.token_hex(3)}"  # folders of this run only: the VM user may be shared
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
