"""Command-line flags shared by the subcommands that reach a VM, mapped onto RelayOptions."""

from __future__ import annotations

import argparse
from typing import Any

from ..options import RelayOptions

# flag → option name; every flag's help text is the option's own help.
CONNECTION_FLAGS = {
    "--jump": "jump",
    "--ssh-config": "ssh_config_file",
    "--identity-file": "identity_file",
    "--remote-python": "remote_python",
    "--remote-workdir": "remote_workdir",
    "--lease-seconds": "lease_seconds",
    "--connect-timeout-seconds": "connect_timeout_seconds",
}


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """Add the flags above, each documented by its option's help."""
    for flag, name in CONNECTION_FLAGS.items():
        trait = RelayOptions.class_traits()[name]
        kind = float if name.endswith("_seconds") else str
        parser.add_argument(flag, dest=name, type=kind, default=None, help=trait.help)
    parser.add_argument(
        "--accept-unknown-host-keys", dest="accept_unknown_host_keys", action="store_true", default=None,
        help=RelayOptions.class_traits()["accept_unknown_host_keys"].help,
    )


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options the user set on the command line (others keep their defaults)."""
    names = [*CONNECTION_FLAGS.values(), "accept_unknown_host_keys"]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
