"""The bootstrap and heartbeat cell: set the VM up, keep its tunnel to the relay, and show one live status.

The cell ``relaykernel cell`` prints calls ``run()``; everything here needs only the standard library and the
OpenSSH binaries (sshd, ssh, ssh-keygen), so it runs on any notebook VM.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.destination import Destination
from ..common.errors import VM, VMSetupError
from ..common.protocol import RUN_ROOT
from ..common.relay_keys import tunnel_key_line
from ..common.version import CELL_INFO_FILE, cell_info
from .checkpoint import DEFAULT_PATTERNS, Checkpointer, save_settings
from .checkpoint_schedule import CheckpointSchedule
from .keys import KeyPair, stable_key
from .notebook_env import capture_notebook_env
from .platforms import PLATFORMS, Platform
from .private import PRIVATE_FILE, append_private, private_dir, tighten, tighten_tree, write_private
from .sshd import SshdInfo, ensure_sshd
from .status import VMStatus, gpu_summary, kernel_leases, runtime_left_seconds
from .tunnel import UP, TunnelSupervisor

HOST_KEY_NAME = "ssh_host_ed25519_key"
TUNNEL_KEY_NAME = "tunnel_ed25519_key"
_FIRST_UP_SECONDS = 15.0


@dataclass(frozen=True)
class CellSettings:
    """Everything the cell was asked to do, with the platform's defaults filled in."""

    platform: Platform
    relay: str
    remote_port: int
    authorized_keys: tuple[str, ...]
    storage_dir: Path
    state_dir: Path
    heartbeat_seconds: float
    sshd_port: int
    ssh_options: tuple[str, ...]
    laptop_alias: str
    workdir: Path
    checkpoint_paths: tuple[str, ...]
    checkpoint_interval_seconds: float
    restore_on_start: bool
    project: str


def run(**arguments: Any) -> None:
    """Set the VM up, then show the status every heartbeat_seconds until the cell is interrupted (or SIGTERM)."""
    HeartbeatCell(settings_for(**arguments)).run()


def settings_for(*, platform: str, relay: str, remote_port: int = 7423, authorized_keys: Sequence[str] = (),
                 storage_dir: str = "", state_dir: str = "~/.relaykernel/vm", heartbeat_seconds: float = 60.0,
                 sshd_port: int = 22, ssh_options: Sequence[str] = (), laptop_alias: str = "", workdir: str = "",
                 checkpoint_paths: Sequence[str] = DEFAULT_PATTERNS, checkpoint_interval_seconds: float = 300.0,
                 restore_on_start: bool = True, project: str = "") -> CellSettings:
    """Check the arguments once, with a fix for each mistake."""
    if platform not in PLATFORMS:
        raise VMSetupError(VM, "cell", f"unknown platform {platform!r}", f"use one of {', '.join(PLATFORMS)}")
    preset = PLATFORMS[platform]
    Destination.parse(relay)
    for name, port in (("remote_port", remote_port), ("sshd_port", sshd_port)):
        if not 0 < port < 65536:
            raise VMSetupError(VM, "cell", f"{name} = {port} is not a TCP port", "use 1..65535")
    for name, seconds in (("heartbeat_seconds", heartbeat_seconds),
                          ("checkpoint_interval_seconds", checkpoint_interval_seconds)):
        if seconds < 1:
            raise VMSetupError(VM, "cell", f"{name} = {seconds} is too small", "use 1 or more")
    work = Path(os.path.expanduser(workdir or preset.workdir))
    return CellSettings(
        platform=preset, relay=relay, remote_port=remote_port,
        authorized_keys=tuple(line.strip() for line in authorized_keys if line.strip()),
        storage_dir=Path(os.path.expanduser(storage_dir or preset.storage_dir)),
        state_dir=Path(os.path.expanduser(state_dir)), heartbeat_seconds=heartbeat_seconds, sshd_port=sshd_port,
        ssh_options=tuple(ssh_options), laptop_alias=laptop_alias or preset.laptop_alias, workdir=work,
        checkpoint_paths=tuple(checkpoint_paths), checkpoint_interval_seconds=checkpoint_interval_seconds,
        restore_on_start=restore_on_start, project=project or work.name,
    )


class HeartbeatCell:
    """The cell's life: set up, print what the laptop and the relay need, then one status updated in place."""

    def __init__(self, settings: CellSettings) -> None:
        self.settings = settings
        self.log_file = settings.state_dir / "cell.log"
        self.status_file = settings.state_dir / "status.json"
        self.tunnel: TunnelSupervisor | None = None
        self.tunnel_key: KeyPair | None = None
        self.checkpoints: CheckpointSchedule | None = None
        self._display: Any = None

    def run(self) -> None:
        with contextlib.suppress(ValueError):  # not the main thread: no SIGTERM handler, Ctrl-C still works
            signal.signal(signal.SIGTERM, _terminated)
        try:
            sshd = self.set_up()
            self._introduce(sshd)
            while True:
                status = self.snapshot()
                if self.checkpoints is not None:
                    self.checkpoints.tick(len(status.kernels))
                    status.checkpoint = self.checkpoints.status
                self.show(status)
                time.sleep(self.settings.heartbeat_seconds)
        except KeyboardInterrupt:
            self._say("interrupted: taking the tunnel down (kernels keep running under their leases)")
        except _Terminated:
            self._say("the VM is being stopped (SIGTERM): a last checkpoint, then the tunnel goes down")
            if self.checkpoints is not None:
                self.checkpoints.now()
                self._say(f"checkpoint {self.checkpoints.status}")
        finally:
            self.stop()

    def set_up(self) -> SshdInfo:
        """Keys, sshd, the notebook's environment and the tunnel; returns the sshd the tunnel exposes."""
        settings = self.settings
        self._check_storage()
        tighten_tree(settings.state_dir, self._note)  # what an earlier run (or another tool) left readable
        private_dir(settings.state_dir)
        write_private(Path(os.path.expanduser(CELL_INFO_FILE)), json.dumps(cell_info()))
        keys_dir = settings.state_dir / "keys"
        host_key = None
        if os.geteuid() == 0:
            host_key = stable_key(storage_dir=settings.storage_dir / "host_keys", local_dir=keys_dir,
                                  name=HOST_KEY_NAME, comment="relaykernel-vm-host", note=self._note)
        self.tunnel_key = stable_key(storage_dir=settings.storage_dir, local_dir=keys_dir, name=TUNNEL_KEY_NAME,
                                     comment=f"relaykernel-vm-tunnel-{settings.platform.name}", note=self._note)
        known_hosts = settings.storage_dir / "relay_known_hosts"
        append_private(known_hosts, "")  # ssh adds the relay's key with the default umask otherwise
        tighten(known_hosts, PRIVATE_FILE, self._note)
        self._set_up_checkpoints()  # the restore comes before sshd: no kernel can start before it is done
        sshd = ensure_sshd(state_dir=settings.state_dir / "sshd", port=settings.sshd_port,
                           authorized_keys=list(settings.authorized_keys), host_key=host_key)
        capture_notebook_env()
        self.tunnel = TunnelSupervisor(
            relay=settings.relay, remote_port=settings.remote_port, sshd_port=sshd.port,
            identity_file=self.tunnel_key.private_file, known_hosts_file=known_hosts,
            log_file=settings.state_dir / "tunnel.log", ssh_options=settings.ssh_options,
        ).start()
        self.tunnel.wait_until_up(_FIRST_UP_SECONDS, or_failed=True)  # a first run prints the relay's key line now
        return sshd

    def _set_up_checkpoints(self) -> None:
        settings = self.settings
        storage = settings.storage_dir / settings.project
        saver = Checkpointer(workdir=settings.workdir, storage=storage, patterns=settings.checkpoint_paths,
                             mount=settings.storage_dir.parent)
        save_settings(workdir=settings.workdir, storage=storage, mount=settings.storage_dir.parent,
                      patterns=settings.checkpoint_paths)
        self.checkpoints = CheckpointSchedule(saver, interval_seconds=settings.checkpoint_interval_seconds)
        if settings.restore_on_start:
            self._say(self.checkpoints.restore())

    def snapshot(self) -> VMStatus:
        assert self.tunnel is not None
        return VMStatus(
            at=time.time(), platform=self.settings.platform.name, relay=self.settings.relay,
            remote_port=self.settings.remote_port, tunnel=self.tunnel.state,
            kernels=kernel_leases(RUN_ROOT), gpu=gpu_summary(),
            runtime_left_seconds=runtime_left_seconds(self.settings.platform.runtime_limit_hours),
        )

    def show(self, status: VMStatus) -> None:
        """Update the one status display (a new line per beat outside IPython), the status file and the log."""
        text = status.as_text(self.settings.platform.title, self.log_file)
        write_private(self.status_file, status.as_json())
        failed = f", checkpoint {status.checkpoint}" if status.checkpoint.startswith("FAILED") else ""
        append_private(self.log_file, f"{time.strftime('%Y-%m-%d %H:%M:%S')} tunnel {status.tunnel.status}, "
                                      f"{len(status.kernels)} kernel(s){failed}\n")
        self._update_display(text)

    def stop(self) -> None:
        if self.tunnel is not None:
            self.tunnel.stop()
            self.show(self.snapshot())

    def _check_storage(self) -> None:
        parent = self.settings.storage_dir.parent
        if self.settings.platform.makes_storage_parent and not parent.is_dir():
            private_dir(parent)  # a plain box: its disk is the persistent place
        if not parent.is_dir():
            fix = ("mount Google Drive first (from google.colab import drive; drive.mount('/content/drive'))"
                   if self.settings.platform.name == "colab" else "create it, or pass another storage directory")
            raise VMSetupError(VM, "storage", f"{parent} does not exist, so keys cannot outlive this VM", fix)

    def _introduce(self, sshd: SshdInfo) -> None:
        settings = self.settings
        fingerprint = _fingerprint(sshd.host_public_key)
        kept = f"kept in {settings.storage_dir / 'host_keys'}" if sshd.managed else "the platform's own sshd"
        lines = [
            f"VM host key {fingerprint} ({kept})",
            f"on your laptop, trust it once:  relaykernel trust {settings.laptop_alias} --fingerprint {fingerprint}",
        ]
        if self.tunnel is not None and self.tunnel_key is not None and self.tunnel.state.status != UP:
            lines += [
                f"the tunnel is not up yet ({self.tunnel.state.detail}); if the relay does not know this VM's key,",
                "add this line to the relay user's ~/.ssh/authorized_keys (once: the key is kept in storage):",
                f"  {tunnel_key_line(self.tunnel_key.public_key, settings.remote_port)}",
            ]
        for line in lines:
            self._say(line)

    def _say(self, line: str) -> None:
        print(line, flush=True)
        private_dir(self.log_file.parent)
        append_private(self.log_file, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def _note(self, line: str) -> None:
        self._say(f"fixed a mode: {line}")

    def _update_display(self, text: str) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import Pretty, display
        except ImportError:
            get_ipython = None  # noqa: N806 - a plain python process: print each beat
        if get_ipython is None or get_ipython() is None:
            print(text, "\n", flush=True)
        elif self._display is None:
            self._display = display(Pretty(text), display_id=True)
        else:
            self._display.update(Pretty(text))


class _Terminated(Exception):
    """SIGTERM reached the cell (the platform is stopping the VM)."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _fingerprint(public_key_line: str) -> str:
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
