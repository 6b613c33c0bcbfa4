"""``relaykernel install``: write a kernelspec that runs its kernel on the VM."""

from __future__ import annotations

import argparse
import os
import sys

from ..kernelspec import build_kernel_json, check_name, install_kernelspec
from ..options import RelayOptions
from .options_args import add_connection_flags, given_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("install", help="install a kernelspec for a kernel on the VM")
    parser.add_argument("--name", required=True, help="kernelspec name (letters, digits, . _ -)")
    parser.add_argument("--host", required=True, help=RelayOptions.class_traits()["host"].help)
    parser.add_argument("--display-name", help="name shown in the kernel picker (default: 'Python on HOST')")
    add_connection_flags(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user (default)")
    where.add_argument("--sys-prefix", action="store_true", help="install into this Python environment")
    where.add_argument("--prefix", help="install under this prefix (PREFIX/share/jupyter/kernels)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = {"host": args.host, **given_options(args)}
    if "ssh_config_file" in config:
        config["ssh_config_file"] = os.path.abspath(os.path.expanduser(config["ssh_config_file"]))
    if "identity_file" in config:
        config["identity_file"] = os.path.abspath(os.path.expanduser(config["identity_file"]))
    RelayOptions(**config)  # validate now, not when the kernel starts
    display_name = args.display_name or f"Python on {args.host} (relaykernel)"
    prefix = sys.prefix if args.sys_prefix else args.prefix
    path = install_kernelspec(
        name=check_name(args.name), kernel_json=build_kernel_json(display_name=display_name, config=config),
        user=prefix is None, prefix=prefix,
    )
    print(f"installed kernelspec {args.name!r} in {path}")
    print(f"select {display_name!r} in JupyterLab's or VS Code's kernel picker; check the path with:")
    print(f"  relaykernel doctor {args.host}" + (f" --jump {args.jump}" if args.jump else ""))
    return 0
