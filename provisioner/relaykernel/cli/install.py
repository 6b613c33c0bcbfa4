"""``relaykernel install``: write a kernelspec that runs its kernel on the VM."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

from ..common.errors import ConfigError
from ..kernelspec import build_kernel_json, check_name, install_kernelspec, load_kernel_json
from ..loader import check_names
from ..logs import step
from ..options import RelayOptions
from .options_args import add_flags, flags_given


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("install", help="install a kernelspec for a kernel on the VM")
    parser.add_argument(
        "--from", dest="template", metavar="DIR",
        help="start from this kernelspec directory (e.g. kernelspecs/colab): its name, display name and settings "
        "are the defaults, and argv[0] becomes this python's absolute path (what VS Code needs)",
    )
    parser.add_argument("--name", help="kernelspec name (letters, digits, . _ -); default: the --from directory's")
    parser.add_argument("--display-name", help="name shown in the kernel picker (default: 'Python on HOST')")
    parser.add_argument("--no-debugger", dest="debugger", action="store_false",
                        help="grey out JupyterLab's debugger (for a VM whose ipykernel lacks debugpy)")
    add_flags(parser, "install")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user (default)")
    where.add_argument("--sys-prefix", action="store_true", help="install into this Python environment")
    where.add_argument("--prefix", help="install under this prefix (PREFIX/share/jupyter/kernels)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with step("loading the options"):  # only the template's and the flags' go into the spec; config files stay live
        template = load_kernel_json(args.template) if args.template else {}
        config = _config(args, template)
        RelayOptions(**config).sync_dir(None)  # validate now, not when the kernel starts
    name = args.name or (os.path.basename(os.path.normpath(args.template)) if args.template else "")
    if not name:
        raise ConfigError("name the kernelspec: --name NAME (or start from a stock spec with --from DIR)")
    display_name = _display_name(args, template, config["host"], name)
    prefix = sys.prefix if args.sys_prefix else args.prefix
    with step(f"installing the kernelspec {name!r}"):
        path = install_kernelspec(
            name=check_name(name), kernel_json=build_kernel_json(display_name=display_name, config=config,
                                                                debugger=args.debugger),
            user=prefix is None, prefix=prefix,
        )
    print(f"installed kernelspec {name!r} in {path}")
    print(f"select {display_name!r} in JupyterLab's or VS Code's kernel picker; check the path with:")
    print(f"  {doctor_command(name, path)}")
    return 0


def doctor_command(name: str, path: str) -> str:
    """The doctor command for the spec just installed: by name where Jupyter finds it, else by its folder."""
    found = KernelSpecManager().find_kernel_specs().get(name)
    if found and os.path.realpath(found) == os.path.realpath(path):
        return f"relaykernel doctor {name}"
    return f"relaykernel doctor {name} --spec {shlex.quote(path)}"


def _config(args: argparse.Namespace, template: dict[str, Any]) -> dict[str, Any]:
    """The template's provisioner config, overridden by the flags given; paths made absolute."""
    config = dict(template.get("metadata", {}).get("kernel_provisioner", {}).get("config", {}))
    check_names(config, f"the provisioner config of {args.template}")
    config.update(flags_given(args, "install"))
    if not config.get("host"):
        raise ConfigError("name the VM: --host DEST (an ssh config alias such as 'colab', or user@host:port)")
    for key in ("ssh_config_file", "identity_file", "sync_local_dir"):
        if config.get(key) and str(config[key]).lower() != "none":
            config[key] = os.path.abspath(os.path.expanduser(config[key]))
    return config


def _display_name(args: argparse.Namespace, template: dict[str, Any], host: str, name: str) -> str:
    """The flag's; else one that tells this VM from others: 'Python on HOST', or the template's plus the name."""
    if args.display_name:
        return str(args.display_name)
    shown = str(template.get("display_name") or "")
    if not shown or args.host:
        return f"Python on {host} (relaykernel)"
    if name != os.path.basename(os.path.normpath(args.template)):  # a second VM from the same stock spec
        return f"{shown} [{name}]"
    return shown
