"""The bootstrap cell run on a bare VM as a notebook would run it, then a kernel started through what it set up."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from cell_topology import VM_ALIAS, CellTopology
from helpers import execute, kernel_manager, wait_until
from relaykernel.cli.cell import cell_source
from relaykernel.common.version import cell_info
from relaykernel.sandbox.keys import known_hosts_line
from topology import VM_USER

pytestmark = [pytest.mark.usefixtures("no_ssh_agent"), pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="the cell tests build a network namespace: root only")]
UP_SECONDS = 20.0
# What `relaykernel cell` writes into every cell when no config, kernelspec or flag says otherwise.
# Kernels run in one folder per laptop project under the platform's work dir: the checkpoints reach into each.
CELL_DEFAULTS = {"heartbeat_seconds": 60.0, "checkpoint_paths": ["outputs/**", "checkpoints/**", "*/outputs/**",
                                                                 "*/checkpoints/**"],
                 "checkpoint_interval_seconds": 300.0, "restore_on_start": True}
MARKER = "RELAYKERNEL_NOTEBOOK_MARKER"


@pytest.fixture
def vm(tmp_path):
    topology = CellTopology().start()
    yield topology
    topology.stop()


@pytest.fixture
def root_state(tmp_path):
    """The cell's local state for root: under /root (sshd's StrictModes refuses keys below /tmp)."""
    state = Path.home() / ".relaykernel" / f"vm-test-{secrets.token_hex(4)}"
    yield state
    shutil.rmtree(state, ignore_errors=True)


class Cell:
    """One run of the generated cell on the VM, with its status file and log at hand."""

    def __init__(self, vm: CellTopology, arguments: dict, *, user: str, state_dir: Path, log: Path) -> None:
        self.state_dir = state_dir
        self.log = log
        self.source = cell_source(**arguments, state_dir=str(state_dir))
        self.marker = secrets.token_hex(8)
        env = {MARKER: self.marker, "LD_LIBRARY_PATH": "/usr/lib64-nvidia"}
        self.process = vm.run_cell(self.source, user=user, log=log, env=env)

    @classmethod
    def watch(cls, process: subprocess.Popen[bytes], state_dir: Path, log: Path) -> Cell:
        """A cell some other way started (a notebook's cell source run as it is)."""
        cell = cls.__new__(cls)
        cell.state_dir, cell.log, cell.process, cell.marker, cell.source = state_dir, log, process, "", ""
        return cell

    def status(self) -> dict:
        try:
            return json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def tunnel(self) -> str:
        return self.status().get("tunnel", {}).get("status", "")

    def wait_for_tunnel(self, *wanted: str, timeout: float = UP_SECONDS) -> bool:
        """True once the tunnel's status is one of ``wanted`` (False if the cell ended or the time ran out)."""
        return bool(wait_until(lambda: self.tunnel() in wanted or self.process.poll() is not None, timeout)) and \
            self.tunnel() in wanted

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def interrupt(self) -> int:
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(15)


def start_cell(vm: CellTopology, tmp_path: Path, storage: Path, state_dir: Path, user: str = "root",
               **overrides: object) -> Cell:
    log = tmp_path / f"cell-{secrets.token_hex(3)}.log"
    return Cell(vm, vm.cell_arguments(storage, **overrides), user=user, state_dir=state_dir, log=log)


def authorize_when_made(vm: CellTopology, cell: Cell, storage: Path) -> None:
    """What the user does after a first run: put the key the cell made (and printed) on the relay."""
    key = storage / "tunnel_ed25519_key.pub"
    assert wait_until(key.exists, UP_SECONDS), cell.output()
    vm.authorize_tunnel_key(key.read_text().strip())


def bring_up(vm: CellTopology, cell: Cell, storage: Path) -> Cell:
    """The first run through to a tunnel that is up."""
    authorize_when_made(vm, cell, storage)
    assert cell.wait_for_tunnel("up", timeout=40), cell.output()
    return cell


def vm_host_key_line(vm: CellTopology, storage: Path) -> str:
    public = (storage / "host_keys" / "ssh_host_ed25519_key.pub").read_text().split()
    return known_hosts_line(vm.forward_port, f"{public[0]} {public[1]}")


def relay_kernel(vm: CellTopology, tmp_path: Path, *, vm_user: str, known: list[str], ssh_config: str = "",
                 remote_workdir: str = ""):
    config = {
        "host": VM_ALIAS, "ssh_config_file": ssh_config or vm.laptop_ssh_config(vm_user, known),
        "remote_python": "/usr/bin/python3",
        "remote_workdir": remote_workdir or f"~/rk-cell-{secrets.token_hex(4)}", "connect_timeout_seconds": 5.0,
        "command_timeout_seconds": 5.0, "liveness_interval_seconds": 0.5, "reconnect_max_backoff_seconds": 1.0,
        "sync_local_dir": "none",
    }
    km = kernel_manager(tmp_path, config, name=f"cell{secrets.token_hex(3)}")
    km.start_kernel()
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=30)
    return km, client


def stop_kernel(km, client) -> None:
    client.stop_channels()
    if km.has_kernel:
        km.shutdown_kernel()


def trust(ssh_config: str, fingerprint: str) -> subprocess.CompletedProcess[str]:
    """`relaykernel trust` as the cell tells the user to run it, on the laptop."""
    return subprocess.run(
        [sys.executable, "-m", "relaykernel", "trust", VM_ALIAS, "--ssh-config", ssh_config, "--fingerprint",
         fingerprint], capture_output=True, text=True, timeout=60, check=False,
    )


def tunnel_ssh_pids(vm: CellTopology) -> list[int]:
    pids = []
    for pid in vm.netns_pids():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command[0].endswith(b"ssh") and b"-R" in command:
            pids.append(pid)
    return pids


def test_root_cell_first_run_tunnel_kernel_env_and_recovery(vm, tmp_path, root_state):
    storage = tmp_path / "drive"
    cell = start_cell(vm, tmp_path, storage, root_state)
    assert cell.wait_for_tunnel("refused", "down"), cell.output()
    output = cell.output()
    assert "relaykernel trust cellvm --fingerprint SHA256:" in output
    assert 'permitlisten="127.0.0.1:' in output, "the cell must print the relay's authorized_keys line"
    tunnel_key = (storage / "tunnel_ed25519_key.pub").read_text().strip()
    assert tunnel_key in output
    vm.authorize_tunnel_key(tunnel_key)
    assert cell.wait_for_tunnel("up", timeout=40), cell.output()

    ssh_config = vm.laptop_ssh_config("root", [])
    printed = re.search(r"relaykernel trust cellvm --fingerprint (SHA256:\S+)", output).group(1)
    refused = trust(ssh_config, "SHA256:" + "A" * 43)
    assert refused.returncode == 1 and "do not trust it" in refused.stderr
    trusted = trust(ssh_config, printed)
    assert trusted.returncode == 0 and "trusted" in trusted.stdout, trusted.stderr
    assert "already trusted" in trust(ssh_config, printed).stdout

    km, client = relay_kernel(vm, tmp_path, vm_user="root", known=[], ssh_config=ssh_config)
    try:
        out, _ = execute(client, f"import os, getpass; print(getpass.getuser(), os.environ['{MARKER}'], "
                                 "os.environ['LD_LIBRARY_PATH']); x = 41")
        assert out.split() == ["root", cell.marker, "/usr/lib64-nvidia"]
        assert wait_until(lambda: len(cell.status().get("kernels", [])) == 1, 5), cell.status()

        for pid in tunnel_ssh_pids(vm):
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: cell.tunnel() != "up", 5)
        assert cell.wait_for_tunnel("up", timeout=10), f"the tunnel was not back within 10 s: {cell.status()}"
        client.wait_for_ready(timeout=30)
        out, _ = execute(client, "x += 1; print(x)", timeout_seconds=30)
        assert out.strip() == "42", "the kernel started before the cut must keep its state"
    finally:
        stop_kernel(km, client)
    assert cell.interrupt() == 0
    assert not tunnel_ssh_pids(vm), "interrupting the cell must take the tunnel down"
    assert cell.status()["tunnel"]["status"] == "stopped"


def test_a_recycled_vm_with_the_same_storage_keeps_its_host_key(vm, tmp_path, root_state):
    storage = tmp_path / "drive"
    first = start_cell(vm, tmp_path, storage, root_state)
    bring_up(vm, first, storage)
    known = [vm_host_key_line(vm, storage)]
    km, client = relay_kernel(vm, tmp_path, vm_user="root", known=known)
    stop_kernel(km, client)

    vm.kill_vm()
    shutil.rmtree(root_state)  # a new VM: nothing local survives, only the storage
    second = start_cell(vm, tmp_path, storage, root_state)
    assert second.wait_for_tunnel("up", timeout=40), second.output()
    km, client = relay_kernel(vm, tmp_path, vm_user="root", known=known)  # the same known_hosts, unedited
    try:
        out, _ = execute(client, "print('again')")
        assert out.strip() == "again"
    finally:
        stop_kernel(km, client)


def test_a_relay_that_refuses_the_forward_is_reported(vm, tmp_path, root_state):
    storage = tmp_path / "drive"
    cell = start_cell(vm, tmp_path, storage, root_state, remote_port=vm.spare_port)
    authorize_when_made(vm, cell, storage)  # for forward_port only
    assert wait_until(lambda: "refused to listen" in cell.status().get("tunnel", {}).get("detail", ""), 40), \
        cell.status()
    assert cell.tunnel() == "refused"


def test_non_root_cell_reuses_the_platform_sshd(vm, tmp_path):
    vm.platform_sshd()
    home = Path(f"~{VM_USER}").expanduser()
    storage, state = home / f"rk-storage-{secrets.token_hex(3)}", home / f".relaykernel/vm-{secrets.token_hex(3)}"
    keys_file = home / ".ssh/authorized_keys"
    saved = keys_file.read_bytes() if keys_file.exists() else None
    try:
        subprocess.run(["runuser", "-u", VM_USER, "--", "mkdir", "-p", str(storage)], check=True)
        cell = start_cell(vm, tmp_path, storage, state, user=VM_USER, platform="aistudio",
                          workdir=str(home / "rk-work"))
        assert "pip install" not in cell.source
        bring_up(vm, cell, storage)
        assert private_modes(state, storage, *cell_files_at_home(home), store=storage / "rk-work") == {}
        assert not (storage / "host_keys").exists(), "only root runs its own sshd with a kept host key"
        scanned = subprocess.run(["ip", "netns", "exec", vm.netns, "ssh-keyscan", "-t", "ed25519", "127.0.0.1"],
                                 capture_output=True, text=True, check=True).stdout.split()
        km, client = relay_kernel(vm, tmp_path, vm_user=VM_USER,
                                  known=[known_hosts_line(vm.forward_port, f"{scanned[1]} {scanned[2]}")])
        try:
            out, _ = execute(client, f"import getpass, os; print(getpass.getuser(), os.environ['{MARKER}']); "
                                     + NOT_INSTALLED)
            assert out.split("\n")[:2] == [f"{VM_USER} {cell.marker}", "relaykernel on the VM: None"], out
        finally:
            stop_kernel(km, client)
        assert cell.interrupt() == 0
    finally:
        if saved is None:
            keys_file.unlink(missing_ok=True)
        else:
            keys_file.write_bytes(saved)
        shutil.rmtree(storage, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(home / "rk-work", ignore_errors=True)
        for leftover in cell_files_at_home(home):
            leftover.unlink(missing_ok=True)


def test_the_printed_cell_is_what_runs(tmp_path):
    """`relaykernel cell` prints cell_source's text: the tests run the very cell users paste."""
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA me@laptop\n")
    printed = subprocess.run(
        [sys.executable, "-m", "relaykernel", "cell", "--platform", "kaggle", "--relay", "me@relay.example.org",
         "--authorize", str(key)], capture_output=True, text=True, check=True,
    ).stdout
    expected = cell_source(platform="kaggle", relay="me@relay.example.org", remote_port=7423,
                           authorized_keys=[key.read_text().strip()], **CELL_DEFAULTS)
    assert printed == expected + "\n"
    compile(printed, "cell", "exec")


def test_out_writes_a_bootstrap_notebook_holding_the_same_cell(tmp_path):
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA me@laptop\n")
    out = tmp_path / "bootstrap.ipynb"
    subprocess.run([sys.executable, "-m", "relaykernel", "cell", "--platform", "colab", "--relay", "me@relay:2222",
                    "--authorize", str(key), "--out", str(out)], capture_output=True, check=True)
    notebook = nbformat.read(str(out), as_version=4)
    nbformat.validate(notebook)
    (cell,) = notebook.cells
    assert cell.source == cell_source(platform="colab", relay="me@relay:2222", remote_port=7423,
                                      authorized_keys=[key.read_text().strip()], **CELL_DEFAULTS)
    assert 'drive.mount("/content/drive")' in cell.source


def test_the_cell_refuses_bad_arguments_before_it_reaches_the_vm(tmp_path):
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA me@laptop\n")
    for bad, says in ((["--remote-port", "0"], "not a TCP port"), (["--relay", "bad host"], "bad SSH destination"),
                      (["--authorize", str(tmp_path / "none.pub")], "cannot read public key")):
        argv = ["--relay", "me@relay", "--authorize", str(key), *bad]
        result = subprocess.run([sys.executable, "-m", "relaykernel", "cell", *argv], capture_output=True, text=True)
        assert result.returncode == 1 and says in result.stderr, (bad, result.stderr)


def test_in_a_notebook_the_status_is_one_display_updated_in_place(tmp_path):
    """In IPython the heartbeat cell shows one display and updates it, instead of scrolling a line per beat."""
    from jupyter_client.manager import start_new_kernel

    code = f"""
import time
from relaykernel.vm.cell import HeartbeatCell, settings_for
from relaykernel.vm.status import VMStatus
from relaykernel.vm.tunnel import TunnelState
settings = settings_for(platform="colab", relay="me@relay", remote_port=7423, authorized_keys=[], storage_dir="",
                        state_dir={str(tmp_path)!r}, heartbeat_seconds=1, sshd_port=22, ssh_options=[],
                        laptop_alias="")
cell = HeartbeatCell(settings)
for status in ("starting", "up"):
    cell.show(VMStatus(at=time.time(), platform="colab", relay="me@relay", remote_port=7423,
                       tunnel=TunnelState(status, time.time())))
"""
    km, client = start_new_kernel(kernel_name="python3")  # this environment's ipykernel, relaykernel installed
    try:
        messages: list[dict] = []
        reply = client.execute_interactive(code, output_hook=messages.append, timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)
    shown = [m for m in messages if m["msg_type"] in ("display_data", "update_display_data", "stream")]
    assert [m["msg_type"] for m in shown] == ["display_data", "update_display_data"], shown
    first, update = (m["content"] for m in shown)
    assert first["transient"]["display_id"] == update["transient"]["display_id"]
    assert "tunnel   starting" in first["data"]["text/plain"] and "tunnel   up" in update["data"]["text/plain"]
    assert json.loads((tmp_path / "status.json").read_text())["tunnel"]["status"] == "up"


def manifest_paths(storage: Path) -> set[str]:
    """Files in the newest complete checkpoint under storage (any project)."""
    manifests = sorted(storage.rglob("manifests/*.json"), key=lambda path: path.name)
    return set(json.loads(manifests[-1].read_text())["files"]) if manifests else set()


def checkpoint_cli(vm: CellTopology, ssh_config: str, *action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaykernel", "checkpoint", VM_ALIAS, *action, "--ssh-config",
                           ssh_config, "--remote-python", "/usr/bin/python3"], capture_output=True, text=True,
                          timeout=60)


def test_checkpoints_reach_storage_and_a_fresh_vm_restores_them_before_the_first_cell(vm, tmp_path, root_state):
    storage, workdir = tmp_path / "drive", f"/root/rk-ckpt-{secrets.token_hex(3)}"
    storage.mkdir()
    try:
        cell = start_cell(vm, tmp_path, storage / "relaykernel", root_state, workdir=workdir,
                          checkpoint_interval_seconds=3.0)
        bring_up(vm, cell, storage / "relaykernel")
        ssh_config = vm.laptop_ssh_config("root", [vm_host_key_line(vm, storage / "relaykernel")])
        km, client = relay_kernel(vm, tmp_path, vm_user="root", known=[], ssh_config=ssh_config,
                                  remote_workdir=workdir)
        try:
            execute(client, "import os; os.makedirs('outputs', exist_ok=True); "
                            "open('outputs/result.txt', 'w').write('trained'); open('scratch.tmp', 'w').write('x')")
            written = time.monotonic()
            assert wait_until(lambda: "outputs/result.txt" in manifest_paths(storage), 3.0 + 5.0), cell.status()
            assert time.monotonic() - written < 3.0 + 5.0
            assert "scratch.tmp" not in manifest_paths(storage), "only the checkpoint paths are kept"
            assert wait_until(lambda: cell.status().get("checkpoint", "").startswith("2"), 5), cell.status()
            listed = checkpoint_cli(vm, ssh_config, "list")
            assert listed.returncode == 0 and "file(s)" in listed.stdout, listed.stderr
            execute(client, "open('outputs/late.txt', 'w').write('just before the VM went')")
        finally:
            stop_kernel(km, client)
        os.killpg(cell.process.pid, signal.SIGTERM)  # the platform stops the VM
        assert cell.process.wait(30) == 0
        assert "outputs/late.txt" in manifest_paths(storage), "SIGTERM must leave a last checkpoint"

        vm.kill_vm()
        subprocess.run(["rm", "-rf", workdir, str(root_state)], check=True)  # a fresh VM: only storage survives
        again = start_cell(vm, tmp_path, storage / "relaykernel", root_state, workdir=workdir)
        assert again.wait_for_tunnel("up", timeout=40), again.output()
        assert "restored 2 file(s) from the last checkpoint" in again.output()
        km, client = relay_kernel(vm, tmp_path, vm_user="root", known=[], ssh_config=ssh_config,
                                  remote_workdir=workdir)
        try:
            out, _ = execute(client, "print(open('outputs/result.txt').read(), open('outputs/late.txt').read())")
            assert out.strip() == "trained just before the VM went", "the first cell must find the outputs"
        finally:
            stop_kernel(km, client)
    finally:
        subprocess.run(["rm", "-rf", workdir], check=False)


def test_full_storage_shows_in_the_status_and_the_kernel_keeps_running(vm, tmp_path, root_state):
    drive = tmp_path / "small-drive"
    drive.mkdir()
    workdir = f"/root/rk-full-{secrets.token_hex(3)}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(drive)], check=True)
    try:
        cell = start_cell(vm, tmp_path, drive / "relaykernel", root_state, workdir=workdir,
                          checkpoint_interval_seconds=2.0)
        bring_up(vm, cell, drive / "relaykernel")
        km, client = relay_kernel(vm, tmp_path, vm_user="root", known=[vm_host_key_line(vm, drive / "relaykernel")],
                                  remote_workdir=workdir)
        try:
            execute(client, "import os; os.makedirs('outputs', exist_ok=True); "
                            "open('outputs/big.bin', 'wb').write(os.urandom(3 << 20))")
            assert wait_until(lambda: "storage full" in cell.status().get("checkpoint", ""), 15), cell.status()
            assert "checkpoint FAILED" in (root_state / "cell.log").read_text(), "the log says it too"
            out, _ = execute(client, "print('still here')")
            assert out.strip() == "still here"
        finally:
            stop_kernel(km, client)
        assert cell.interrupt() == 0
    finally:
        subprocess.run(["umount", "-l", str(drive)], check=False)
        subprocess.run(["rm", "-rf", workdir], check=False)


def test_cell_settings_come_from_jupyter_config_then_the_kernelspec_then_flags(tmp_path):
    config_dir, spec_dir = tmp_path / "jupyter-config", tmp_path / "spec"
    config_dir.mkdir()
    (config_dir / "jupyter_relaykernel_config.py").write_text(
        "c.RelayOptions.checkpoint_interval_seconds = 120\nc.RelayOptions.heartbeat_seconds = 30\n")
    spec_dir.mkdir()
    (spec_dir / "kernel.json").write_text(json.dumps({"metadata": {"kernel_provisioner": {"config": {
        "host": "colab", "remote_workdir": "/content/project", "heartbeat_seconds": 10}}}}))
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA me@laptop\n")
    printed = subprocess.run(
        [sys.executable, "-m", "relaykernel", "cell", "--relay", "me@relay", "--authorize", str(key), "--spec",
         str(spec_dir), "--checkpoint-path", "results/**"], capture_output=True, text=True, check=True,
        env={**os.environ, "JUPYTER_CONFIG_DIR": str(config_dir)},
    ).stdout
    for setting in ("checkpoint_interval_seconds=120.0,", "heartbeat_seconds=10.0,", "workdir='/content/project',",
                    "checkpoint_paths=['results/**'],"):
        assert setting in printed, (setting, printed)


def test_a_kernel_that_ends_is_checkpointed_without_waiting_for_the_interval(vm, tmp_path, root_state):
    storage, workdir = tmp_path / "drive", f"/root/rk-end-{secrets.token_hex(3)}"
    storage.mkdir()
    try:
        cell = start_cell(vm, tmp_path, storage / "relaykernel", root_state, workdir=workdir,
                          checkpoint_interval_seconds=3600.0)
        bring_up(vm, cell, storage / "relaykernel")
        km, client = relay_kernel(vm, tmp_path, vm_user="root", known=[vm_host_key_line(vm, storage / "relaykernel")],
                                  remote_workdir=workdir)
        try:
            execute(client, "import os; os.makedirs('outputs', exist_ok=True); open('outputs/final.txt', 'w')"
                            ".write('done')")
            assert wait_until(lambda: len(cell.status().get("kernels", [])) == 1, 5)
            assert "outputs/final.txt" not in manifest_paths(storage), "no checkpoint before the kernel ends"
        finally:
            stop_kernel(km, client)
        assert wait_until(lambda: "outputs/final.txt" in manifest_paths(storage), 5), cell.status()
        assert cell.interrupt() == 0
    finally:
        subprocess.run(["rm", "-rf", workdir], check=False)


# ---- a fresh VM (no relaykernel installed, no package index) runs the cell as printed, for each preset ----

NOT_INSTALLED = "import importlib.util; print('relaykernel on the VM:', importlib.util.find_spec('relaykernel'))"


def private_modes(*roots: Path, store: Path | None = None) -> dict[str, str]:
    """Files or folders under ROOTS that others may read or write (the checkpoint STORE's contents aside)."""
    loose = {}
    for root in roots:
        paths = [root, *root.rglob("*")] if root.is_dir() else [root]
        for path in paths:
            if store is not None and store in path.parents:
                continue
            mode = path.lstat().st_mode & 0o777
            if mode & 0o077:
                loose[str(path)] = oct(mode)
    return loose


def cell_files_at_home(home: Path) -> list[Path]:
    return [home / ".relaykernel" / name for name in ("cell.json", "notebook-env.json", "checkpoint.json")]


def check_a_kernel_starts_on_a_fresh_vm(vm: CellTopology, tmp_path: Path, *, vm_user: str, known: list[str],
                                        workdir: str) -> None:
    km, client = relay_kernel(vm, tmp_path, vm_user=vm_user, known=known, remote_workdir=workdir)
    try:
        out, _ = execute(client, f"import getpass; print(getpass.getuser()); {NOT_INSTALLED}")
        assert out.split("\n")[:2] == [vm_user, "relaykernel on the VM: None"], out
    finally:
        stop_kernel(km, client)


@pytest.fixture(scope="module")
def shared_vm():
    """One relay + bare VM for the preset runs: each run is a new cell on the same VM, as a user re-runs it."""
    topology = CellTopology().start()
    yield topology
    topology.stop()


@pytest.mark.parametrize("platform,via", [("generic", "printed"), ("kaggle", "--out"),
                                          pytest.param("colab", "printed", marks=pytest.mark.slow)])
def test_a_fresh_vm_runs_the_printed_cell_as_root(shared_vm, tmp_path, platform, via):
    storage, state = tmp_path / "storage", Path.home() / ".relaykernel" / f"vm-test-{secrets.token_hex(4)}"
    workdir = f"/root/rk-fresh-{secrets.token_hex(3)}"
    arguments = shared_vm.cell_arguments(storage, platform=platform, workdir=workdir)
    source = cell_source(**arguments, state_dir=str(state))
    if via == "--out":
        source = notebook_cell(tmp_path, arguments, state)
    assert "pip install" not in source and "PYTHONPATH" not in source
    log = tmp_path / "cell.log"
    try:
        process = shared_vm.run_cell(source, user="root", log=log, env={"LD_LIBRARY_PATH": "/usr/lib64-nvidia"})
        cell = Cell.watch(process, state, log)
        bring_up(shared_vm, cell, storage)
        assert cell.status()["platform"] == platform
        assert json.loads((Path.home() / ".relaykernel" / "cell.json").read_text()) == cell_info()
        check_a_kernel_starts_on_a_fresh_vm(shared_vm, tmp_path, vm_user="root",
                                            known=[vm_host_key_line(shared_vm, storage)], workdir=workdir)
        assert private_modes(state, storage, *cell_files_at_home(Path.home()), store=storage / Path(workdir).name) \
            == {}
        assert cell.interrupt() == 0
    finally:
        shared_vm.kill_vm()  # the next run is a fresh VM: its own sshd on port 22
        shutil.rmtree(state, ignore_errors=True)
        subprocess.run(["rm", "-rf", workdir], check=False)


def notebook_cell(tmp_path: Path, arguments: dict, state: Path) -> str:
    """`relaykernel cell --out`'s notebook, written by the CLI, and the source of its one cell."""
    key = tmp_path / "laptop.pub"
    key.write_text(arguments["authorized_keys"][0] + "\n")
    out = tmp_path / "bootstrap.ipynb"
    argv = ["--platform", arguments["platform"], "--relay", arguments["relay"], "--remote-port",
            str(arguments["remote_port"]), "--authorize", str(key), "--storage", arguments["storage_dir"],
            "--heartbeat-seconds", "1", "--laptop-alias", arguments["laptop_alias"], "--workdir",
            arguments["workdir"], "--state-dir", str(state), "--out", str(out)]
    for option in arguments["ssh_options"]:
        argv += ["--ssh-option", option]
    subprocess.run([sys.executable, "-m", "relaykernel", "cell", *argv], check=True, capture_output=True, timeout=60)
    (cell,) = nbformat.read(str(out), as_version=4).cells
    return str(cell.source)
