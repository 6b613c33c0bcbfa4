"""``relaykernel cell``: the notebook cell that sets a VM up (sshd, keys, tunnel, heartbeat), to paste or upload."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .. import __version__
from ..common.errors import ConfigError
from ..vm.cell import settings_for
from ..vm.platforms import PLATFORMS
from .options_args import add_flags, options_for

_DEFAULT_PUBLIC_KEYS = ("~/.ssh/id_ed25519.pub", "~/.ssh/id_ecdsa.pub", "~/.ssh/id_rsa.pub")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cell", help="print the notebook cell that connects a VM to the relay")
    parser.add_argument("--platform", choices=sorted(PLATFORMS), default="generic", help="the notebook platform")
    parser.add_argument("--relay", required=True, help="the relay as the VM reaches it: user@host[:port]")
    parser.add_argument("--remote-port", type=int, default=7423, help="port the relay listens on for this VM")
    parser.add_argument("--authorize", action="append", default=[], metavar="PUBKEY_FILE",
                        help="public key allowed to log in to the VM (repeatable; default: your first of "
                        + ", ".join(_DEFAULT_PUBLIC_KEYS) + ")")
    parser.add_argument("--storage", default="", metavar="DIR",
                        help="persistent directory on the VM for host keys (default: the platform's)")
    parser.add_argument("--spec", metavar="KERNELSPEC_DIR",
                        help="take the work dir and the heartbeat and checkpoint settings from this kernelspec's "
                        "provisioner config (e.g. kernelspecs/colab, or an installed one)")
    add_flags(parser, "cell")
    parser.add_argument("--no-restore", dest="restore_on_start", action="store_false", default=None,
                        help="the same as --no-restore-on-start")
    parser.add_argument("--project", default="", help="the checkpoints' folder name in storage (default: the "
                        "work dir's name)")
    parser.add_argument("--sshd-port", type=int, default=22, help="port of the VM's sshd on its 127.0.0.1")
    parser.add_argument("--ssh-option", action="append", default=[], metavar="OPTION",
                        help="extra ssh -o option for the tunnel, e.g. 'ProxyCommand=…' (repeatable)")
    parser.add_argument("--state-dir", default="~/.relaykernel/vm", metavar="DIR",
                        help="private local directory on the VM for the cell's keys, sshd config and logs")
    parser.add_argument("--laptop-alias", default="", help="the VM's Host alias on your laptop (for the trust "
                        "command the cell prints; default: the platform's stock kernelspec host)")
    parser.add_argument("--install", default="", metavar="PIP_SPEC",
                        help="what the cell pip-installs when the VM lacks this relaykernel version (default: "
                        f"relaykernel=={__version__} from the package index; or a wheel URL, a git+https URL…)")
    parser.add_argument("--out", type=Path, help="write a bootstrap notebook (.ipynb) instead of printing")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    keys = [_read_public_key(path) for path in (args.authorize or [_default_public_key()])]
    source = cell_source(platform=args.platform, relay=args.relay, remote_port=args.remote_port,
                         authorized_keys=keys, storage_dir=args.storage, sshd_port=args.sshd_port,
                         ssh_options=args.ssh_option, laptop_alias=args.laptop_alias, state_dir=args.state_dir,
                         install=args.install, **_kernel_side_settings(args))
    if args.out:
        import nbformat  # ~2 s to import (its schema checker): only when a notebook is written

        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
        nbformat.write(notebook, str(args.out))
        print(f"wrote {args.out}: upload it to the VM's notebook platform and run its one cell")
    else:
        print(source)
    return 0


def cell_source(*, platform: str, relay: str, remote_port: int, authorized_keys: list[str], storage_dir: str = "",
                sshd_port: int = 22, ssh_options: list[str] | None = None, laptop_alias: str = "",
                state_dir: str = "~/.relaykernel/vm", install: str = "", **kernel_side: Any) -> str:
    """The cell's Python source: install relaykernel (this version) if needed, then relaykernel.vm.cell.run."""
    arguments: dict[str, Any] = {
        "platform": platform, "relay": relay, "remote_port": remote_port, "authorized_keys": authorized_keys,
        "storage_dir": storage_dir, "sshd_port": sshd_port, "ssh_options": list(ssh_options or []),
        "laptop_alias": laptop_alias, "state_dir": state_dir, **kernel_side,
    }
    settings_for(**arguments)  # what can be checked here must not fail on the VM
    requirement = install or f"relaykernel=={__version__}"
    lines = [f"# relaykernel {__version__}: connect this {PLATFORMS[platform].title} VM to the relay {relay}",
             "# (generated by `relaykernel cell`; interrupt the cell to take the tunnel down)"]
    if platform == "colab" and not storage_dir:
        lines += ["from google.colab import drive", 'drive.mount("/content/drive")  # host keys outlive the VM there']
    lines += [
        "import importlib, subprocess, sys",
        "try:",
        "    from relaykernel import __version__ as installed",
        "except ImportError:",
        "    installed = None",
        f"if installed != {__version__!r}:  # the laptop's version: both sides speak the same protocol",
        f'    subprocess.run([sys.executable, "-m", "pip", "install", "-q", {requirement!r}], check=True)',
        '    sys.modules.pop("relaykernel", None)',
        "    importlib.invalidate_caches()",
        "from relaykernel.vm.cell import run",
        "run(",
        *[f"    {name}={value!r}," for name, value in arguments.items()],
        ")",
    ]
    return "\n".join(lines) + "\n"


def _kernel_side_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Heartbeat, work dir and checkpoint settings: the flags, else the kernelspec's config, else Jupyter config."""
    options = options_for(args, "cell", spec_dir=args.spec)
    chosen: dict[str, Any] = {}
    for name in ("heartbeat_seconds", "checkpoint_paths", "checkpoint_interval_seconds", "restore_on_start"):
        value = getattr(options, name)
        chosen[name] = list(value) if isinstance(value, list) else value
    if "remote_workdir" in options.sources:  # else the platform's own default work dir
        chosen["workdir"] = options.remote_workdir
    if args.project:
        chosen["project"] = args.project
    return chosen


def _default_public_key() -> str:
    for candidate in _DEFAULT_PUBLIC_KEYS:
        if os.path.exists(os.path.expanduser(candidate)):
            return candidate
    raise ConfigError("no public key to authorize: pass --authorize ~/.ssh/KEY.pub (ssh-keygen -t ed25519 makes one)")


def _read_public_key(path: str) -> str:
    try:
        text = Path(os.path.expanduser(path)).read_text().strip()
    except OSError as error:
        raise ConfigError(f"cannot read public key {path}: {error.strerror}") from None
    if not text.startswith(("ssh-", "ecdsa-", "sk-")) or "PRIVATE KEY" in text:
        raise ConfigError(f"{path} is not an OpenSSH public key (pass the .pub file)")
    return text.splitlines()[0]
