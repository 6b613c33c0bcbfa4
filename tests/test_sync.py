"""Work-directory sync against the real topology: the VM's copy checked by the VM's own tools."""

from __future__ import annotations

import ast
import hashlib
import os
import pwd
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    VM_ALIAS,
    environment_without_agent,
    execute,
    kernel_manager,
    relay_config,
    running_kernel,
    wait_until,
    write_ssh_config,
)
from relaykernel.kernelspec import build_kernel_json, install_kernelspec
from relaykernel.options import RelayOptions
from relaykernel.relayed import build_chain
from relaykernel.ssh.chain import SSHChain
from relaykernel.sync.engine import WorkdirSync
from relaykernel.sync.ignore import IgnoreRules
from relaykernel.sync.remote import RemoteTree
from vscode import VSCodeKernel

pytestmark = pytest.mark.usefixtures("no_ssh_agent")
VISIBLE_SECONDS = 5.0


@pytest.fixture
def chain(topology, tmp_path) -> Iterator[SSHChain]:
    chain = build_chain(RelayOptions(**relay_config(topology, tmp_path)))
    chain.connect()
    yield chain
    chain.close()


@pytest.fixture
def remote(topology, chain) -> Iterator[RemoteTree]:
    root = f"rk-sync-{secrets.token_hex(4)}"
    yield RemoteTree(chain, python_argv=[topology.vm_python], root=f"~/{root}", timeout_seconds=30.0)
    topology.vm_run(["rm", "-rf", root])


@pytest.fixture
def local(tmp_path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    return folder


def vm_tree(topology, remote: RemoteTree) -> dict[str, str]:
    """path -> sha256 of every file under the remote root, as the VM's find and sha256sum see them."""
    root = remote.root.replace("~/", "")
    listing = topology.vm_run(["sh", "-c", f"cd {root} && find . -type f -exec sha256sum {{}} +"]).stdout
    return {line.split(None, 1)[1].strip()[2:]: line.split()[0] for line in listing.splitlines()}


def local_tree(root: Path, paths: list[str]) -> dict[str, str]:
    return {path: hashlib.sha256((root / path).read_bytes()).hexdigest() for path in paths}


def write(root: Path, path: str, data: bytes | str) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data.encode() if isinstance(data, str) else data)


def test_initial_sync_mirrors_the_tree_minus_ignored_and_sends_only_differences(topology, remote, local):
    files = {f"pkg/mod{i}.py": f"X = {i}\n" for i in range(50)}
    files |= {f"data/d{i}/{j}.csv": os.urandom(2000) for i in range(5) for j in range(20)}
    files |= {".gitignore": "*.log\nbuild/\n!keep.log\n", "data/.gitignore": "d4/\n", "keep.log": "kept\n"}
    for path, data in files.items():
        write(local, path, data)
    for ignored in ("run.log", "build/out.bin", ".git/HEAD", "__pycache__/m.pyc", ".venv/bin/python",
                    ".ipynb_checkpoints/nb.ipynb"):
        write(local, ignored, "ignored")
    write(local, "huge.bin", os.urandom(3000))
    rules = IgnoreRules(local, max_file_size_bytes=2500)
    report = WorkdirSync(local, remote, rules).initial()
    expected = sorted(path for path in files if not path.startswith("data/d4/"))
    assert not report.errors and report.written == len(expected)
    assert vm_tree(topology, remote) == local_tree(local, expected)

    again = WorkdirSync(local, remote, IgnoreRules(local, max_file_size_bytes=2500)).initial()
    assert (again.written, again.sent_bytes) == (0, 0), "an unchanged tree sends nothing"
    write(local, "pkg/mod7.py", "X = 'changed'\n")
    third = WorkdirSync(local, remote, IgnoreRules(local, max_file_size_bytes=2500)).initial()
    assert third.written == 1


@pytest.fixture
def watching(remote, local) -> Iterator[WorkdirSync]:
    sync = WorkdirSync(local, remote, IgnoreRules(local), rescan_seconds=3.0)
    sync.initial()
    sync.watch()
    yield sync
    sync.stop()


def visible(topology, remote, expected: dict[str, str | None]) -> bool:
    """Whether the VM holds exactly these contents (None: absent) for these paths."""
    tree = vm_tree(topology, remote)
    for path, content in expected.items():
        want = None if content is None else hashlib.sha256(content.encode()).hexdigest()
        if tree.get(path) != want:
            return False
    return True


def test_saves_deletes_moves_and_safe_writes_reach_the_vm(topology, remote, local, watching):
    write(local, "notes.txt", "one")
    assert wait_until(lambda: visible(topology, remote, {"notes.txt": "one"}), VISIBLE_SECONDS)
    write(local, "notes.txt", "two")
    assert wait_until(lambda: visible(topology, remote, {"notes.txt": "two"}), VISIBLE_SECONDS)

    write(local, ".notes.txt.swp.tmp", "three")  # an editor's safe write: a temporary, then a rename over
    os.replace(local / ".notes.txt.swp.tmp", local / "notes.txt")
    write(local, "pkg/a.py", "A")
    write(local, "pkg/b.py", "B")
    assert wait_until(lambda: visible(topology, remote, {"notes.txt": "three", ".notes.txt.swp.tmp": None,
                                                         "pkg/a.py": "A"}), VISIBLE_SECONDS)

    os.rename(local / "pkg", local / "lib")
    (local / "notes.txt").unlink()
    assert wait_until(lambda: visible(topology, remote, {"lib/a.py": "A", "lib/b.py": "B", "pkg/a.py": None,
                                                         "notes.txt": None}), VISIBLE_SECONDS)


def test_a_file_being_written_is_never_seen_half_written_on_the_vm(topology, remote, local, watching):
    size = 50 << 20
    root = remote.root.replace("~/", "")
    account = pwd.getpwnam(topology.vm_user) if topology.vm_user != "root" else None
    poller = ("import os, time\n"
              f"path, seen, end = os.path.expanduser('~/{root}/big.bin'), set(), time.time() + 60\n"
              "while time.time() < end:\n"
              "    size = os.path.getsize(path) if os.path.exists(path) else -1\n"
              "    seen.add(size)\n"
              f"    if size == {size}:\n"
              "        break\n"
              "    time.sleep(0.002)\n"
              "print(sorted(seen))\n")
    prefix = ["ip", "netns", "exec", topology.netns] if topology.netns else []
    if account is not None:
        prefix += ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups", "--"]
    watcher = subprocess.Popen([*prefix, "/usr/bin/python3", "-c", poller], stdout=subprocess.PIPE, text=True,
                               cwd=account.pw_dir if account else None,
                               env={**os.environ, "HOME": account.pw_dir} if account else None)
    try:
        with open(local / "big.bin", "wb") as out:
            for _ in range(size >> 20):
                out.write(os.urandom(1 << 20))
                out.flush()
        seen = watcher.communicate(timeout=60)[0]  # the poller ends once it sees the whole file
    finally:
        watcher.kill()
        watcher.wait()
    observed = ast.literal_eval(seen)
    assert size in observed, f"the poller never saw the whole file: {observed}"
    assert set(observed) <= {-1, size}, f"a reader on the VM saw big.bin at sizes {observed}"
    print(f"a VM reader polling every 2 ms saw big.bin at sizes {observed}")


def test_a_mass_delete_is_refused_and_said(topology, remote, local, caplog):
    for i in range(30):
        write(local, f"src/f{i}.py", str(i))
    sync = WorkdirSync(local, remote, IgnoreRules(local), max_delete_count=20)
    sync.initial()
    for i in range(30):
        (local / f"src/f{i}.py").unlink()
    report = sync.sync_paths({f"src/f{i}.py" for i in range(30)})
    assert report.deleted == 0 and len(report.refused_deletes) == 30
    assert "refusing to delete 30 files" in caplog.text
    assert len([p for p in vm_tree(topology, remote) if p.startswith("src/")]) == 30, "the VM keeps them"
    write(local, "src/one.py", "1")
    sync.initial()
    (local / "src/one.py").unlink()
    assert sync.sync_paths({"src/one.py"}).deleted == 1, "a single delete still goes through"


def test_a_rescan_catches_what_the_watcher_missed(topology, remote, local):
    sync = WorkdirSync(local, remote, IgnoreRules(local), settle_seconds=0.0)
    sync.initial()
    write(local, "missed.txt", "no event was watched for this")
    report = sync.rescan()
    assert report.written == 1 and visible(topology, remote, {"missed.txt": "no event was watched for this"})


def test_a_kernel_runs_in_a_mirror_of_the_folder_it_was_started_from(topology, tmp_path, local):
    write(local, "mymodule.py", "VALUE = 1\n")
    write(local, "data/input.csv", "a,b\n1,2\n")
    km = kernel_manager(tmp_path, relay_config(topology, tmp_path, sync_local_dir=""))
    km.start_kernel(cwd=str(local))  # as jupyter_server starts a notebook's kernel: in the notebook's folder
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=30)
        first = "import os; print(open('mymodule.py').read().strip(), open('data/input.csv').read().split()[1]) " \
                "if os.path.exists('data/input.csv') else print('not yet')"
        assert wait_until(lambda: execute(client, first)[0].split() == ["VALUE", "=", "1", "1,2"], VISIBLE_SECONDS), \
            "the local folder's files must reach the kernel (the kernel does not wait for the first sync)"
        execute(client, "import mymodule")
        write(local, "mymodule.py", "VALUE = 2\n")
        assert wait_until(lambda: execute(client, "import importlib; print(importlib.reload(mymodule).VALUE)")[0]
                          .strip() == "2", VISIBLE_SECONDS), "a save must reach the kernel"
        out, _ = execute(client, "import os; print(os.path.abspath('mymodule.py'))")
        assert km.resolve_path(out.strip()) == str(local / "mymodule.py")
        assert km.resolve_path("data/input.csv") == str(local / "data/input.csv")
        assert km.resolve_path("/etc/passwd") is None
    finally:
        client.stop_channels()
        km.shutdown_kernel()


def test_the_argv_launcher_mirrors_the_notebook_folder_it_runs_in(topology, tmp_path):
    config = relay_config(topology, tmp_path, sync_local_dir="")
    spec = build_kernel_json(display_name=f"Sync {tmp_path.name}", config=config)
    spec_dir = Path(install_kernelspec(name="vssync", kernel_json=spec, prefix=str(tmp_path / "prefix")))
    notebooks, runtime = tmp_path / "notebooks", tmp_path / "runtime"
    runtime.mkdir()
    write(notebooks, "helper.py", "def answer():\n    return 42\n")
    kernel = VSCodeKernel(spec_dir, runtime_dir=runtime, notebook_dir=notebooks, env=environment_without_agent())
    try:
        kernel.launch()
        out, _ = execute(kernel.client, "import helper; print(helper.answer())")
        assert out.strip() == "42"
    finally:
        kernel.dispose()


def test_outputs_come_back_and_a_local_edit_is_never_overwritten(topology, remote, local):
    write(local, "outputs/notes.txt", "mine")
    sync = WorkdirSync(local, remote, IgnoreRules(local))
    sync.initial()
    root = remote.root.replace("~/", "")
    topology.vm_run(["sh", "-c", f"mkdir -p {root}/outputs/run1 && echo weights > {root}/outputs/run1/model.bin && "
                                 f"echo theirs > {root}/outputs/notes.txt && echo no > {root}/elsewhere.txt"])
    write(local, "outputs/notes.txt", "edited here meanwhile")
    report = sync.pull(["outputs"])
    assert (report.fetched, report.conflicts) == (2, ["outputs/notes.txt"])
    assert (local / "outputs/run1/model.bin").read_text() == "weights\n"
    assert (local / "outputs/notes.txt").read_text() == "edited here meanwhile"
    assert (local / "outputs/notes (from VM).txt").read_text() == "theirs\n"
    assert not (local / "elsewhere.txt").exists(), "only the output folders come back"
    assert sync.pull(["outputs"]).fetched == 0, "what came back is not fetched again"
    assert sync.sync_paths({"outputs/run1/model.bin"}).written == 0, "nor sent back to the VM"


def test_a_kernel_s_outputs_are_here_after_it_shuts_down(topology, tmp_path, local):
    with running_kernel(tmp_path, relay_config(topology, tmp_path, sync_local_dir=str(local))) as (_, client):
        execute(client, "import os; os.makedirs('outputs', exist_ok=True); open('outputs/result.txt', 'w')"
                        ".write('trained')")
    assert (local / "outputs/result.txt").read_text() == "trained"


def test_relaykernel_sync_mirrors_a_folder_with_a_progress_bar(topology, tmp_path, local):
    for i in range(20):
        write(local, f"src/m{i}.py", f"N = {i}\n")
    write(local, "skip.tmp", "local only")
    target = f"rk-cli-sync-{secrets.token_hex(3)}"
    result = subprocess.run(
        [sys.executable, "-m", "relaykernel", "sync", VM_ALIAS, str(local), f"~/{target}", "--ignore", "*.tmp",
         "--ssh-config", write_ssh_config(topology, tmp_path), "--remote-python", topology.vm_python],
        capture_output=True, text=True, timeout=120, env=environment_without_agent(),
    )
    try:
        assert result.returncode == 0, result.stderr
        assert "20/20 files" in result.stderr and "20 written" in result.stderr
        listing = topology.vm_run(["sh", "-c", f"cd {target} && find . -type f | sort"]).stdout.split()
        assert listing == sorted(f"./src/m{i}.py" for i in range(20))
    finally:
        topology.vm_run(["rm", "-rf", target])
