"""Which options each subcommand offers as flags (the flags themselves are generated from the traits)."""

from __future__ import annotations

import argparse
from typing import Any

from ..loader import add_option_flags, given_flags, load_options
from ..options import RelayOptions

CONNECTION = ("jump", "ssh_config_file", "identity_file", "accept_unknown_host_keys", "connect_timeout_seconds",
              "command_timeout_seconds")
"""What every subcommand that reaches the VM needs."""

CELL = ("remote_workdir", "heartbeat_seconds", "checkpoint_paths", "checkpoint_interval_seconds", "restore_on_start")
"""What the VM's heartbeat cell uses."""

PROVISIONER_ONLY = ("shutdown_wait_seconds", "stable_start_seconds")
"""jupyter_client's shutdown and restart timing: only the provisioner has a KernelManager to tell."""

KERNEL = tuple(name for name in sorted(RelayOptions.class_trait_names(config=True))
               if name not in ("host", *CONNECTION, *CELL[1:], *PROVISIONER_ONLY))
"""What a running kernel uses (``relaykernel launch``): every other option, so a new one reaches both fronts."""

PROVISIONER = ("host", *CONNECTION, *KERNEL, *PROVISIONER_ONLY)
"""What the provisioner (JupyterLab, nbclient, papermill) uses; it reads every option, as its config is all of them."""

BY_COMMAND: dict[str, tuple[str, ...]] = {
    "launch": ("host", *CONNECTION, *KERNEL),
    "install": ("host", *CONNECTION, *KERNEL, *PROVISIONER_ONLY, *CELL[1:]),
    "doctor": (*CONNECTION, "remote_python", "remote_workdir"),
    "trust": CONNECTION,
    "checkpoint": (*CONNECTION, "remote_python"),
    "sync": (*CONNECTION, "remote_python", "sync_ignore", "sync_max_file_size_mb"),
    "cell": CELL,
}
"""The options each subcommand offers as flags; the options reference lists the fronts that read each option."""


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The command's option flags, generated from the traits (help, default and unit from each option)."""
    add_option_flags(parser, BY_COMMAND[command])


def flags_given(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The options set on this command line."""
    return given_flags(args, BY_COMMAND[command])


def options_for(args: argparse.Namespace, command: str, *, spec_dir: str | None = None, **fixed: Any) -> RelayOptions:
    """The options in effect: Jupyter config files, then the kernelspec (``spec_dir``), then the flags and ``fixed``."""
    return load_options(flags={**flags_given(args, command), **fixed}, spec_dir=spec_dir)
