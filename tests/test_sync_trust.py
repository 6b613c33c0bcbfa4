"""Sync you can trust: a VM folder per project, content compared where mtimes mislead, honest deletes, bounded first
sync, live sync however late, and sync threads that survive surprises. Against the real topology."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import test_sync
from helpers import execute, kernel_manager, relay_config, wait_until
from relaykernel.options import RelayOptions
from relaykernel.ssh.chain import SSHChain
from relaykernel.sync.engine import WorkdirSync
from relaykernel.sync.ignore import IgnoreRules
from relaykernel.sync.mirror import WorkdirMirror
from relaykernel.sync.remote import RemoteTree
from test_sync import visible, vm_tree, write

pytestmark = pytest.mark.usefixtures("no_ssh_agent")
SECONDS = 10.0
chain = test_sync.chain  # the same fixture


@pytest.fixture
def remote_dir(topology) -> Iterator[str]:
    name = f"rk-trust-{secrets.token_hex(4)}"
    yield name
    topology.vm_run(["rm", "-rf", name])


def tree(topology, chain: SSHChain, root: str) -> RemoteTree:
    return RemoteTree(chain, python_argv=[topology.vm_python], root=f"~/{root}", timeout_seconds=30.0)


def twin_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two projects with a same-named file of the same size and the same mtime but different content."""
    a, b = tmp_path / "projA", tmp_path / "projB"
    for folder, text in ((a, "A's data"), (b, "B's data")):
        write(folder, "data.csv", text)
        os.utime(folder / "data.csv", ns=(1_700_000_000_000_000_000,) * 2)
    return a, b


def test_same_size_and_mtime_but_other_content_is_sent(topology, chain, remote_dir, tmp_path):
    a, b = twin_folders(tmp_path)
    WorkdirSync(a, tree(topology, chain, remote_dir), IgnoreRules(a)).initial()
    assert visible(topology, tree(topology, chain, remote_dir), {"data.csv": "A's data"})
    report = WorkdirSync(b, tree(topology, chain, remote_dir), IgnoreRules(b)).initial()  # a shared remote_workdir
    assert report.written == 1, "B's file has A's size and mtime, but not its content: it must be sent"
    assert visible(topology, tree(topology, chain, remote_dir), {"data.csv": "B's data"})
    again = WorkdirSync(b, tree(topology, chain, remote_dir), IgnoreRules(b)).initial()
    assert (again.written, again.sent_bytes) == (0, 0), "the VM's manifest says B wrote it: nothing to send"


def test_same_content_from_another_source_is_adopted_not_sent(topology, chain, remote_dir, tmp_path):
    local = tmp_path / "p"
    for i in range(20):
        write(local, f"m{i}.py", f"X = {i}\n")
    topology.vm_run(["sh", "-c", f"mkdir -p {remote_dir} && cd {remote_dir} && "
                                 + " && ".join(f"echo 'X = {i}' > m{i}.py" for i in range(20))])
    report = WorkdirSync(local, tree(topology, chain, remote_dir), IgnoreRules(local)).initial()
    assert (report.written, report.adopted, report.sent_bytes) == (0, 20, 0)
    again = WorkdirSync(local, tree(topology, chain, remote_dir), IgnoreRules(local)).initial()
    assert (again.written, again.adopted) == (0, 0), "adopted files are in the manifest: no hashing next time"


def test_a_rename_arrives_as_a_rename(topology, chain, remote_dir, tmp_path):
    local = tmp_path / "p"
    write(local, "pkg/model.py", "W = 1\n" * 1000)
    remote = tree(topology, chain, remote_dir)
    sync = WorkdirSync(local, remote, IgnoreRules(local), settle_seconds=0.0)
    sync.initial()
    inode = topology.vm_run(["stat", "-c", "%i", f"{remote_dir}/pkg/model.py"]).stdout.strip()
    os.rename(local / "pkg", local / "lib")
    report = sync.sync_paths({"pkg", "lib"})
    assert (report.moved, report.written, report.deleted, report.sent_bytes) == (1, 0, 0, 0)
    assert topology.vm_run(["stat", "-c", "%i", f"{remote_dir}/lib/model.py"]).stdout.strip() == inode
    assert visible(topology, remote, {"lib/model.py": "W = 1\n" * 1000, "pkg/model.py": None})


def test_a_delete_made_while_no_kernel_ran_is_applied_unless_the_vm_changed_the_file(topology, chain, remote_dir,
                                                                                      tmp_path):
    local = tmp_path / "p"
    for name in ("gone.txt", "changed-there.txt", "kept.txt"):
        write(local, name, name)
    WorkdirSync(local, tree(topology, chain, remote_dir), IgnoreRules(local)).initial()
    (local / "gone.txt").unlink()
    (local / "changed-there.txt").unlink()
    topology.vm_run(["sh", "-c", f"echo 'the VM wrote this' > {remote_dir}/changed-there.txt"])
    topology.vm_run(["sh", "-c", f"echo 'the VM made this' > {remote_dir}/vm-only.txt"])
    report = WorkdirSync(local, tree(topology, chain, remote_dir), IgnoreRules(local)).initial()
    assert (report.deleted, report.conflicts) == (1, ["changed-there.txt"])
    assert set(vm_tree(topology, tree(topology, chain, remote_dir))) == {"changed-there.txt", "kept.txt",
                                                                         "vm-only.txt"}
    assert (local / "changed-there (from VM).txt").read_text() == "the VM wrote this\n"


def test_environments_and_caches_stay_local(topology, chain, remote_dir, tmp_path):
    local = tmp_path / "p"
    write(local, "train.py", "print('hi')\n")
    write(local, "venv/pyvenv.cfg", "home = /usr/bin\n")
    with open(local / "venv" / "big.bin", "wb") as out:
        out.truncate(100 << 20)  # 100 MB, sparse
    write(local, "env/conda-meta/history", "")
    write(local, "env/lib/x.py", "")
    write(local, "node_modules/left-pad/index.js", "")
    write(local, ".pytest_cache/v/x", "")
    write(local, "wanted-env/pyvenv.cfg", "")
    report = WorkdirSync(local, tree(topology, chain, remote_dir), IgnoreRules(local, extra_patterns=["!wanted-env/"]
                                                                                )).initial()
    assert report.written == 2
    assert set(vm_tree(topology, tree(topology, chain, remote_dir))) == {"train.py", "wanted-env/pyvenv.cfg"}


def mirror_options(topology, tmp_path, **overrides) -> RelayOptions:
    return RelayOptions(**relay_config(topology, tmp_path, **overrides))


def test_a_folder_over_the_budget_sends_nothing_and_says_why(topology, chain, remote_dir, tmp_path, caplog):
    local = tmp_path / "p"
    write(local, "notes.py", "x = 1\n")
    write(local, "data/raw.bin", os.urandom(1_500_000))
    write(local, "data/more.bin", os.urandom(600_000))
    options = mirror_options(topology, tmp_path, remote_workdir=f"~/{remote_dir}", sync_initial_budget_mb=1.0)
    caplog.set_level(logging.INFO, logger="relaykernel")
    mirror = WorkdirMirror(options, chain, local).start()
    try:
        assert wait_until(lambda: "over the first sync's budget" in caplog.text, 2.0), caplog.text
        assert "data/ 2.1 MB" in caplog.text and "sync_initial_budget_mb" in caplog.text
        assert topology.vm_run(["test", "-e", f"{remote_dir}/notes.py"]).returncode != 0, "nothing is sent"
    finally:
        mirror.stop()


def test_live_sync_starts_when_a_late_first_sync_ends_and_outputs_come_back(topology, tmp_path, monkeypatch):
    """The first sync outlasts the kernel's launch timeout; the kernel does not wait, and live sync still starts."""
    real_initial, finished = WorkdirSync.initial, threading.Event()

    def slow_initial(self, progress=None):
        time.sleep(6.0)
        try:
            return real_initial(self, progress)
        finally:
            finished.set()

    monkeypatch.setattr(WorkdirSync, "initial", slow_initial)
    local = tmp_path / "p"
    write(local, "early.txt", "there from the start")
    km = kernel_manager(tmp_path, relay_config(topology, tmp_path, sync_local_dir=str(local),
                                               launch_timeout_seconds=4.0, sync_pull_seconds=1.0))
    km.start_kernel()
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=30)
        assert not finished.is_set(), "the kernel must not wait for the first sync"
        assert finished.wait(30), "the first sync never ended"
        write(local, "late.txt", "saved after the first sync")

        def read(name: str) -> str:
            return execute(client, f"import os; print(open('{name}').read() if os.path.exists('{name}') else '')")[0]

        assert wait_until(lambda: read("late.txt").strip() == "saved after the first sync", SECONDS)
        assert read("early.txt").strip() == "there from the start"
        execute(client, "import os; os.makedirs('outputs', exist_ok=True); open('outputs/r.txt', 'w').write('done')")
        assert wait_until(lambda: (local / "outputs/r.txt").exists(), SECONDS), "outputs must come back"
    finally:
        client.stop_channels()
        km.shutdown_kernel()


def test_sync_threads_survive_bad_gitignore_lines_and_unexpected_errors(topology, chain, remote_dir, tmp_path,
                                                                       caplog):
    local = tmp_path / "p"
    local.mkdir()
    remote = tree(topology, chain, remote_dir)
    sync = WorkdirSync(local, remote, IgnoreRules(local), rescan_seconds=0.5)
    sync.initial()
    real_apply, failures = remote.apply, []

    def flaky_apply(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("injected: a library's surprise")
        return real_apply(*args, **kwargs)

    remote.apply = flaky_apply  # type: ignore[method-assign]
    sync.watch()
    try:
        write(local, ".gitignore", "!\n\\\n*.log\n")  # two lines pathspec refuses (GitIgnorePatternError)
        write(local, "first.txt", "one")
        assert wait_until(lambda: visible(topology, remote, {"first.txt": "one"}), SECONDS)
        assert failures, "the injected error was not hit"
        write(local, "second.txt", "two")
        write(local, "skip.log", "kept local")
        assert wait_until(lambda: visible(topology, remote, {"second.txt": "two"}), SECONDS), "the next change syncs"
        assert visible(topology, remote, {"skip.log": None}), "the good .gitignore lines still apply"
        logged = [r for r in caplog.records if "injected: a library's surprise" in r.getMessage()]
        assert len(logged) == 1 and logged[0].exc_info is not None, "logged once, with its traceback"
        assert "skipping the pattern '!'" in caplog.text
        assert sync._rescanner.is_alive() and sync._watcher is not None and sync._watcher._thread.is_alive()
    finally:
        sync.stop()


def test_two_projects_get_their_own_vm_folder_in_both_orders_and_at_once(topology, tmp_path):
    """Through the provisioner: same-named, -sized and -timed files; each kernel reads its own; outputs stay home."""
    a, b = twin_folders(tmp_path)
    base = f"~/rk-projects-{secrets.token_hex(4)}"

    def start(folder: Path, name: str):
        config = relay_config(topology, tmp_path, sync_local_dir=str(folder), remote_workdir="",
                              remote_workdir_base=base)
        km = kernel_manager(tmp_path / name, config, name=name)
        km.start_kernel()
        client = km.client()
        client.start_channels()
        client.wait_for_ready(timeout=60)
        return km, client

    def check(km, client, folder: Path) -> None:
        expected = "A's data" if folder.name == "projA" else "B's data"
        assert wait_until(lambda: execute(client, "import os; print(open('data.csv').read() if os.path.exists("
                                                  "'data.csv') else '')")[0].strip() == expected, SECONDS)
        execute(client, f"import os; os.makedirs('outputs', exist_ok=True); "
                        f"open('outputs/from_{folder.name}.txt', 'w').write('x')")

    def stop(km, client) -> None:
        client.stop_channels()
        km.shutdown_kernel()

    try:
        for first, second in ((a, b), (b, a)):
            for folder in (first, second):
                km, client = start(folder, f"k{folder.name}{secrets.token_hex(2)}")
                try:
                    check(km, client, folder)
                finally:
                    stop(km, client)
        both = [start(a, "katogether"), start(b, "kbtogether")]
        try:
            for (km, client), folder in zip(both, (a, b)):
                check(km, client, folder)
        finally:
            for km, client in both:
                stop(km, client)
        for folder in (a, b):
            outputs = sorted(p.name for p in (folder / "outputs").iterdir())
            assert outputs == [f"from_{folder.name}.txt"], f"{folder.name} got {outputs}"
        dirs = topology.vm_run(["sh", "-c", f"ls {base.removeprefix('~/')}"]).stdout.split()
        assert len(dirs) == 2 and {d.rsplit("-", 1)[0] for d in dirs} == {"projA", "projB"}, dirs
    finally:
        topology.vm_run(["rm", "-rf", base.removeprefix("~/")])
