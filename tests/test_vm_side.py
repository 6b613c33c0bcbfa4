"""The VM side's own rules: what it may import, private files, and a tunnel that stops whenever it is told."""

from __future__ import annotations

import ast
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import wait_until
from relaykernel.vm import tunnel as tunnel_module
from relaykernel.vm.keys import stable_key
from relaykernel.vm.private import tighten_tree, write_private
from relaykernel.vm.tunnel import TunnelSupervisor

PACKAGE = Path(__file__).resolve().parent.parent / "provisioner" / "relaykernel"
OPTIONAL_ON_THE_VM = {"IPython", "ipykernel"}  # imported inside try/except ImportError, where the notebook has them


def imported_modules(path: Path, module: str) -> set[str]:
    """Absolute names of everything PATH imports (relative imports resolved against MODULE)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names if node.level)
    return names


def modules(side: str = "") -> dict[str, Path]:
    root = PACKAGE / side if side else PACKAGE
    found = {}
    for path in root.rglob("*.py"):
        parts = ["relaykernel", *path.relative_to(PACKAGE).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@pytest.mark.parametrize("side", ["vm", "common"])
def test_the_vm_side_imports_only_itself_the_shared_package_and_the_standard_library(side: str) -> None:
    allowed = ("relaykernel.common",) + (("relaykernel.vm",) if side == "vm" else ())
    wrong = {}
    for name, path in modules(side).items():
        for imported in imported_modules(path, name):
            top = imported.split(".")[0]
            if top == "relaykernel":
                if not imported.startswith(allowed):
                    wrong[name] = imported
            elif top not in sys.stdlib_module_names | OPTIONAL_ON_THE_VM | {"__future__"}:
                wrong[name] = imported
    assert wrong == {}


def test_only_the_ssh_package_imports_paramiko() -> None:
    importers = {name for name, path in modules().items()
                 if any(i.split(".")[0] == "paramiko" for i in imported_modules(path, name))}
    assert importers and {name for name in importers if not name.startswith("relaykernel.ssh.")} == set()


def test_a_kept_key_found_readable_by_others_is_tightened_and_said(tmp_path: Path) -> None:
    storage, notes = tmp_path / "storage", []
    stable_key(storage_dir=storage, local_dir=tmp_path / "local", name="k", comment="test")
    (storage / "k").chmod(0o644)
    storage.chmod(0o755)
    again = stable_key(storage_dir=storage, local_dir=tmp_path / "local2", name="k", comment="test",
                       note=notes.append)
    assert again.restored
    assert stat.S_IMODE((storage / "k").stat().st_mode) == 0o600
    assert stat.S_IMODE(storage.stat().st_mode) == 0o700
    assert any("k was mode 0644" in note for note in notes) and any("storage was mode 0755" in n for n in notes)
    for path in [*(tmp_path / "local2").iterdir(), *storage.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_private_writes_and_the_tree_sweep(tmp_path: Path) -> None:
    target = write_private(tmp_path / "a" / "b" / "secret.json", "{}")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    loose = tmp_path / "a" / "loose"
    loose.write_text("x")
    loose.chmod(0o664)
    notes: list[str] = []
    tighten_tree(tmp_path / "a", notes.append)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600 and len(notes) == 1


def test_stop_while_ssh_is_being_started_ends_that_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() arriving between the loop's check and its Popen must still end the new ssh, and return."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # accepts, never says SSH-2.0: ssh waits for the banner
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    tunnel = TunnelSupervisor(relay=f"nobody@127.0.0.1:{silent.getsockname()[1]}", remote_port=7423, sshd_port=22,
                              identity_file=key, known_hosts_file=tmp_path / "known_hosts",
                              log_file=tmp_path / "tunnel.log")
    stopper = threading.Thread(target=tunnel.stop, name="test-stopper")
    spawned: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def racing_popen(argv: list[str], **kwargs: object) -> subprocess.Popen:
        if argv[0] == "ssh" and not stopper.is_alive() and not spawned:
            stopper.start()
            assert wait_until(tunnel._stopping.is_set, 5)  # stop() has begun: the old code missed this ssh
        process = real_popen(argv, **kwargs)
        spawned.append(process)
        return process

    monkeypatch.setattr(tunnel_module.subprocess, "Popen", racing_popen)
    try:
        tunnel.start()
        assert wait_until(lambda: bool(spawned) or not tunnel._thread.is_alive(), 10)
        stopper.join(20)
        assert not stopper.is_alive(), "stop() hung on an ssh it never saw"
        assert not tunnel._thread.is_alive()
        # Ended by stop(), not by its own 15 s banner timeout (what the old race left to happen, if anything).
        assert [process.poll() for process in spawned] == [-signal.SIGTERM], "the ssh started during stop() ran on"
        assert tunnel.state.status == "stopped"
        assert stat.S_IMODE((tmp_path / "tunnel.log").stat().st_mode) == 0o600
    finally:
        for process in spawned:
            if process.poll() is None:
                process.kill()
                process.wait(5)
        silent.close()
    assert os.path.exists(tmp_path / "tunnel.log")


def test_the_tunnel_retries_every_few_seconds_until_it_was_first_up_then_backs_off_fully() -> None:
    def delays(*, ever_up: bool, running_seconds: float) -> list[float]:
        delay, seen = 1.0, []
        for _ in range(7):
            delay = tunnel_module.next_delay(delay, ever_up=ever_up, running_seconds=running_seconds,
                                             max_backoff_seconds=30.0)
            seen.append(delay)
        return seen

    assert delays(ever_up=False, running_seconds=60) == [2, 4, 4, 4, 4, 4, 4], "the relay is being set up"
    assert delays(ever_up=True, running_seconds=60) == [2, 4, 8, 16, 30, 30, 30]
    assert delays(ever_up=False, running_seconds=3600)[-1] == 30, "a relay nobody sets up is not hammered for ever"
