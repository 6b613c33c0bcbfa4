"""Every user-facing setting, as traitlets shared by the provisioner and ``relaykernel launch``."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from pathlib import Path
from typing import Any

from traitlets import Bool, Dict, Float, Int, List, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from .common.destination import Destination, parse_jump_chain
from .common.errors import ConfigError

_KERNEL_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def _at_least(name: str, value: float, minimum: float) -> float:
    if value < minimum:
        msg = f"{name} = {value!r} is too small: use {minimum:g} or more"
        raise ConfigError(msg)
    return value


class RelayOptions(LoggingConfigurable):
    """Where the VM is, how to reach it, and how the remote kernel runs."""

    sources: dict[str, str] = {}
    """Where each option that is not at its default came from (set by ``loader.load_options``)."""

    def __init__(self, **kwargs: Any) -> None:
        """Unknown names and wrongly typed values are one-line ConfigErrors, before anything starts (loader.py)."""
        from .loader import checked_construction  # noqa: PLC0415 - the loader imports this module

        with checked_construction(self, kwargs):
            super().__init__(**kwargs)

    host = Unicode(
        "",
        help="The VM as an SSH destination: a Host alias from ssh config (e.g. 'colab') or "
        "user@host:port (e.g. 'root@127.0.0.1:7423' as seen from the relay).",
    ).tag(config=True)

    jump = Unicode(
        "",
        help="Jump host(s) in OpenSSH -J form: user@relay[:port][,user@host2…]. Empty: use the "
        "host's ProxyJump/ProxyCommand from ssh config.",
    ).tag(config=True)

    ssh_config_file = Unicode(
        "",
        help="ssh config file to read (Host aliases, ProxyJump, IdentityFile, …). Empty: ~/.ssh/config.",
    ).tag(config=True)

    identity_file = Unicode(
        "",
        help="Private key to try first, before ssh-agent and the keys ssh config names.",
    ).tag(config=True)

    accept_unknown_host_keys = Bool(
        False,
        help="Trust and record host keys seen for the first time. Off by default: unknown keys are "
        "refused with the command that trusts them. A changed key is always refused, and so is a new key "
        "for a host that had a pinned key earlier in this run.",
    ).tag(config=True)

    remote_python = Unicode(
        "python3",
        help="Command that runs Python on the VM (words split like a shell would, e.g. "
        "'/opt/conda/bin/python' or 'conda run -n gpu python'). It must have ipykernel.",
    ).tag(config=True)

    remote_workdir = Unicode(
        "",
        help="Directory on the VM the kernel runs in; created if missing. '~' is the VM user's home. Empty: one "
        "folder per local project under remote_workdir_base, named after the synced folder plus a short hash of its "
        "path, so two projects never share files.",
    ).tag(config=True)

    remote_workdir_base = Unicode(
        "~/relaykernel",
        help="Where the per-project work dirs are made on the VM when remote_workdir is empty.",
    ).tag(config=True)

    kernel_module = Unicode(
        "ipykernel_launcher",
        help="Python module the remote kernel is started with (python -m MODULE -f CONNECTION_FILE).",
    ).tag(config=True)

    remote_env = Dict(
        value_trait=Unicode(),
        help="Extra environment variables for the remote kernel, e.g. {'CUDA_VISIBLE_DEVICES': '0'}.",
    ).tag(config=True)

    lease_seconds = Float(
        600.0,
        help="The remote kernel shuts itself down when no client has renewed its lease for this long, "
        "so a vanished laptop leaves no orphan while a network blip kills nothing.",
    ).tag(config=True)

    connect_timeout_seconds = Float(
        15.0, help="Time allowed to connect and authenticate to each SSH hop."
    ).tag(config=True)

    command_timeout_seconds = Float(
        30.0, help="Time allowed for one remote step (open a channel, run a command, send a signal)."
    ).tag(config=True)

    launch_timeout_seconds = Float(
        60.0, help="Time allowed for the remote kernel to start and report its ports."
    ).tag(config=True)

    liveness_interval_seconds = Float(
        1.0,
        help="How often each end of the link says it is alive when it has nothing else to send (this also "
        "renews the kernel's lease).",
    ).tag(config=True)

    link_timeout_seconds = Float(
        5.0,
        help="A link from which nothing at all has arrived for this long (a hang: connections open, bytes "
        "stopped) is declared down and rebuilt; the kernel's streams resume on the new one.",
    ).tag(config=True)

    stream_buffer_mb = Float(
        64.0,
        help="Most data each end holds for the other while the link is down or slow (kernel output on the VM, "
        "client requests here), in MB. When full, that end stops reading from the kernel (or the client), "
        "so the kernel's own ZeroMQ high-water marks apply, as with a slow client of a local kernel.",
    ).tag(config=True)

    reconnect_max_backoff_seconds = Float(
        2.0, help="Upper bound of the wait between reconnect attempts while the link is down (an attempt costs one "
        "connection to the relay; a longer wait delays the first cell after the link is back by as much)."
    ).tag(config=True)

    shutdown_wait_seconds = Float(
        10.0, help="Time a graceful kernel shutdown may take before the kernel is terminated."
    ).tag(config=True)

    stable_start_seconds = Float(
        30.0, help="Upper bound for a kernel (re)start to complete over a slow link."
    ).tag(config=True)

    sync_local_dir = Unicode(
        "",
        help="Local folder mirrored into remote_workdir while the kernel runs (saved files reach the VM in about "
        "a fifth of a second). Empty: the folder the client starts the kernel in (the notebook's folder in "
        "JupyterLab and VS Code). 'none': no sync.",
    ).tag(config=True)

    sync_ignore = List(
        Unicode(),
        help="gitignore patterns kept local, on top of the tree's .gitignore files and the defaults (.git/, "
        "__pycache__/, .ipynb_checkpoints/, .venv/, node_modules/, .tox/, .nox/, .mypy_cache/, .pytest_cache/, "
        ".ruff_cache/, and any folder holding pyvenv.cfg or conda-meta/); '!PATTERN' syncs a default-ignored one.",
    ).tag(config=True)

    sync_max_file_size_mb = Float(100.0, help="Files larger than this stay local.").tag(config=True)

    sync_max_files = Int(
        20000, help="A larger tree is not synced at all (a notebook opened in your home folder, say); the log says so."
    ).tag(config=True)

    sync_initial_budget_mb = Float(
        200.0,
        help="The first sync sends nothing when more than this much would go to the VM; the log names the biggest "
        "folders and the fix (sync_ignore, or a larger budget).",
    ).tag(config=True)

    sync_max_delete_count = Int(
        50, help="Deleting more files than this at once (or over half the tree) is not propagated to the VM."
    ).tag(config=True)

    sync_rescan_seconds = Float(
        30.0, help="How often the whole tree is compared with the VM, for changes the file watcher missed."
    ).tag(config=True)

    sync_output_dirs = List(
        Unicode(),
        default_value=["outputs"],
        help="Folders of the work dir (relative) that come back from the VM every sync_pull_seconds and when the "
        "kernel shuts down. A file changed here meanwhile is kept; the VM's copy lands beside it as 'NAME (from VM)'.",
    ).tag(config=True)

    sync_pull_seconds = Float(30.0, help="How often sync_output_dirs are brought back.").tag(config=True)

    heartbeat_seconds = Float(
        60.0, help="How often the VM's heartbeat cell updates its status (relaykernel cell --spec reads it)."
    ).tag(config=True)

    checkpoint_paths = List(
        Unicode(),
        default_value=["outputs/**", "checkpoints/**"],
        help="What the VM's heartbeat cell checkpoints to persistent storage: globs relative to remote_workdir "
        "('DIR/**' is everything below DIR).",
    ).tag(config=True)

    checkpoint_interval_seconds = Float(
        300.0, help="How often the heartbeat cell checkpoints (also when a kernel ends, and on SIGTERM)."
    ).tag(config=True)

    restore_on_start = Bool(
        True, help="On a fresh VM, the heartbeat cell restores the last checkpoint into remote_workdir before any "
        "kernel starts (never over newer files)."
    ).tag(config=True)

    @validate("host")
    def _check_host(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"]).strip()
        if value:
            Destination.parse(value)
        return value

    @validate("jump")
    def _check_jump(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"]).strip()
        parse_jump_chain(value)
        return value

    @validate("identity_file")
    def _check_identity_file(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"]).strip()
        if value and not os.path.isfile(os.path.expanduser(value)):
            raise ConfigError(f"identity_file = {value!r} does not exist: name your private key, or leave it empty "
                              "to use ssh-agent and ssh config's keys")
        return value

    @validate("remote_python")
    def _check_remote_python(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        try:
            words = shlex.split(value)
        except ValueError as error:
            raise ConfigError(f"remote_python = {value!r} cannot be split into words: {error}") from None
        if not words:
            raise ConfigError("remote_python is empty: name the VM's python, e.g. 'python3'")
        return value

    @validate("kernel_module")
    def _check_kernel_module(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        if not _KERNEL_MODULE.match(value):
            raise ConfigError(f"kernel_module = {value!r} is not a Python module name")
        return value

    @validate("lease_seconds")
    def _check_lease(self, proposal: dict[str, Any]) -> float:
        return _at_least("lease_seconds", proposal["value"], 1.0)

    @validate("sync_max_file_size_mb", "sync_initial_budget_mb",
              "sync_rescan_seconds", "sync_pull_seconds", "heartbeat_seconds",
              "checkpoint_interval_seconds")
    def _check_sync_amounts(self, proposal: dict[str, Any]) -> float:
        return _at_least(proposal["trait"].name, proposal["value"], 0.001)

    @validate("stream_buffer_mb")
    def _check_stream_buffer(self, proposal: dict[str, Any]) -> float:
        return _at_least("stream_buffer_mb", proposal["value"], 1.0)

    @validate("sync_max_files", "sync_max_delete_count")
    def _check_sync_counts(self, proposal: dict[str, Any]) -> int:
        return int(_at_least(proposal["trait"].name, proposal["value"], 1))

    @validate(
        "connect_timeout_seconds",
        "command_timeout_seconds",
        "launch_timeout_seconds",
        "liveness_interval_seconds",
        "link_timeout_seconds",
        "reconnect_max_backoff_seconds",
    )
    def _check_positive(self, proposal: dict[str, Any]) -> float:
        return _at_least(proposal["trait"].name, proposal["value"], 0.1)

    @default("remote_env")
    def _default_remote_env(self) -> dict[str, str]:
        return {}

    def require_host(self) -> Destination:
        """The VM destination, or a ConfigError saying how to name one."""
        if not self.host:
            msg = (
                "no VM host configured: set 'host' in the kernelspec's provisioner config "
                "(relaykernel install --host DEST)"
            )
            raise ConfigError(msg)
        return Destination.parse(self.host)

    def sync_dir(self, client_cwd: str | None) -> Path | None:
        """The local folder to mirror: sync_local_dir, else the client's folder; None when sync is off."""
        chosen = self.sync_local_dir.strip() or client_cwd or os.getcwd()
        if chosen.lower() == "none":
            return None
        folder = Path(os.path.expanduser(chosen)).resolve()
        if not folder.is_dir():
            msg = (f"sync_local_dir = {chosen!r} is not a folder here: create it, name another, "
                   "or set sync_local_dir = 'none' for no sync")
            raise ConfigError(msg)
        return folder

    def kernel_workdir(self, local_dir: Path | None) -> str:
        """The kernel's work dir on the VM for this synced local folder: remote_workdir, else one per project.

        The same folder the kernel is launched in and the sync mirrors into: NAME-HASH under remote_workdir_base,
        NAME readable (the folder's name), HASH the first 8 hex digits of the sha256 of its absolute path.
        """
        if self.remote_workdir.strip():
            return self.remote_workdir
        base = self.remote_workdir_base.rstrip("/") or "~"
        if local_dir is None:
            return base
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", local_dir.name).strip("-.")[:40] or "project"
        digest = hashlib.sha256(str(local_dir.resolve()).encode()).hexdigest()[:8]
        return f"{base}/{name}-{digest}"

    def python_argv(self) -> list[str]:
        """The remote python command as words."""
        return shlex.split(self.remote_python)

    def option_values(self) -> dict[str, Any]:
        """The configurable values, for writing a kernelspec or logging."""
        return {name: getattr(self, name) for name in self.class_own_traits(config=True)}
