"""Benchmark the work-directory sync on the test topology: initial sync vs rsync, save-to-visible latency, idle CPU."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_topology import open_topology
from relaykernel.options import RelayOptions
from relaykernel.relayed import build_chain
from relaykernel.sandbox.tools import find_tool
from relaykernel.sandbox.topology import SandboxInfo
from relaykernel.sync.engine import WorkdirSync
from relaykernel.sync.ignore import IgnoreRules
from relaykernel.sync.remote import RemoteTree

LATENCY_SAMPLES = 40


def make_tree(root: Path, count: int, min_kb: int, max_kb: int, seed: int = 7) -> int:
    """``count`` files of min_kb..max_kb KiB in nested folders; their total size."""
    rng, total = random.Random(seed), 0
    for index in range(count):
        path = root / f"d{index % 10}" / f"s{index % 7}" / f"f{index}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = rng.randint(min_kb, max_kb) * 1024
        path.write_bytes(rng.randbytes(size))
        total += size
    return total


def relaykernel_initial(info: SandboxInfo, local: Path, remote_dir: str) -> float:
    """Seconds for a cold initial sync: connect through the relay, list, send everything."""
    started = time.perf_counter()
    options = RelayOptions(host=info.vm_alias, ssh_config_file=info.ssh_config_file, remote_python=info.vm_python)
    chain = build_chain(options)
    try:
        chain.connect()
        remote = RemoteTree(chain, python_argv=options.python_argv(), root=remote_dir, timeout_seconds=60)
        report = WorkdirSync(local, remote, IgnoreRules(local)).initial()
        if report.errors:
            raise RuntimeError(f"sync failed: {report.errors}")
    finally:
        chain.close()
    return time.perf_counter() - started


def rsync_initial(info: SandboxInfo, local: Path, remote_dir: str) -> float:
    """Seconds for ``rsync -a -e ssh`` of the same tree through the same relay (ProxyJump from the same config)."""
    started = time.perf_counter()
    ssh = f"{find_tool('ssh')} -F {info.ssh_config_file}"
    subprocess.run([find_tool("rsync"), "-a", "-e", ssh, f"{local}/", f"{info.vm_alias}:{remote_dir}/"],
                   check=True, capture_output=True, timeout=300)
    return time.perf_counter() - started


def latencies(info: SandboxInfo, local: Path, remote_dir: str) -> list[float]:
    """Seconds from a local save to the file's arrival on the VM, seen by a poller on the VM (same clock)."""
    options = RelayOptions(host=info.vm_alias, ssh_config_file=info.ssh_config_file, remote_python=info.vm_python)
    chain = build_chain(options)
    chain.connect()
    remote = RemoteTree(chain, python_argv=options.python_argv(), root=remote_dir, timeout_seconds=60)
    sync = WorkdirSync(local, remote, IgnoreRules(local))
    sync.initial()
    sync.watch()
    poller = info_popen(info, remote_dir, LATENCY_SAMPLES)
    try:
        time.sleep(0.5)
        written = []
        for index in range(LATENCY_SAMPLES):
            written.append(time.time())
            (local / f"latency-{index}.txt").write_text(f"save {index}\n")
            time.sleep(0.5)
        arrived = [float(x) for x in poller.communicate(timeout=60)[0].split()]
    finally:
        poller.kill()
        sync.stop()
        chain.close()
    return [a - w for a, w in zip(arrived, written)]


def info_popen(info: SandboxInfo, remote_dir: str, count: int) -> subprocess.Popen[str]:
    code = ("import os, time\n"
            f"root = os.path.expanduser('~/{remote_dir}')\n"
            f"for i in range({count}):\n"
            "    path = os.path.join(root, f'latency-{i}.txt')\n"
            "    while not os.path.exists(path):\n"
            "        time.sleep(0.0005)\n"
            "    print(time.time(), flush=True)\n")
    prefix = ["ip", "netns", "exec", info.netns] if info.netns else []
    if info.netns:
        import pwd

        account = pwd.getpwnam(info.vm_user)
        prefix += ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups", "--"]
        env = {"HOME": account.pw_dir, "PATH": "/usr/bin:/bin"}
    else:
        env = dict(os.environ)
    return subprocess.Popen([*prefix, info.vm_python, "-c", code], stdout=subprocess.PIPE, text=True, env=env)


def idle_cpu(info: SandboxInfo, local: Path, remote_dir: str, seconds: float) -> tuple[float, float]:
    """CPU seconds per minute of an idle watcher over the tree, and the seconds one full rescan takes."""
    options = RelayOptions(host=info.vm_alias, ssh_config_file=info.ssh_config_file, remote_python=info.vm_python)
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
        return per_minute, time.perf_counter() - started
    finally:
        chain.close()


def run(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rk-bench-sync-")))
        info, kind = open_topology(stack)
        tree = scratch / "tree"
        total = make_tree(tree, 1000, 1, 60)
        ours, theirs = [], []
        for round_index in range(args.rounds):
            for name, measure, results in (("relaykernel", relaykernel_initial, ours), ("rsync", rsync_initial,
                                                                                      theirs)):
                target = f"bench-{name}-{round_index}"
                results.append(measure(info, tree, target))
                info.vm_run(["rm", "-rf", target])
                print(f"round {round_index + 1} {name}: {results[-1]:.3f} s", file=sys.stderr, flush=True)
        live = scratch / "live"
        live.mkdir()
        waits = sorted(latencies(info, live, "bench-latency"))
        info.vm_run(["rm", "-rf", "bench-latency"])
        big = scratch / "big"
        make_tree(big, args.idle_files, 1, 2)
        cpu_per_minute, rescan_s = idle_cpu(info, big, "bench-idle", args.idle_seconds)
        info.vm_run(["rm", "-rf", "bench-idle"])
        shutil.rmtree(big, ignore_errors=True)
    ratio = statistics.median(ours) / statistics.median(theirs)
    p50, p95 = waits[len(waits) // 2], waits[int(len(waits) * 0.95) - 1]
    print(f"relaykernel sync, median of {args.rounds} round(s); topology: {kind}; nproc {os.cpu_count()}")
    print(f"initial sync, 1000 files, {total / 1e6:.1f} MB: relaykernel {statistics.median(ours):.3f} s, "
          f"rsync -a -e ssh {statistics.median(theirs):.3f} s, ratio {ratio:.2f}x (target <= 1.0x) "
          f"{'met' if ratio <= 1.0 else 'MISSED'}")
    print(f"save -> visible on the VM, {len(waits)} saves: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms "
          f"(target p50 <= 250 ms) {'met' if p50 <= 0.25 else 'MISSED'}")
    print(f"idle watcher over {args.idle_files} files: {cpu_per_minute:.3f} CPU s per minute; "
          f"one full rescan {rescan_s:.3f} s (every sync_rescan_seconds, 30 s by default)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-files", type=int, default=10000)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    run(parser.parse_args())
    return 0


if __name__ == "__main__":
    sys.exit(main())
