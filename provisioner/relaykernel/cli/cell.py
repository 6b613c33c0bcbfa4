"""``relaykernel cell``: the notebook cell that sets a VM up (sshd, keys, tunnel, heartbeat), to paste or upload."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .. import __version__
from ..bundle import cell_payload
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
                        help="pip-install relaykernel on the VM from PIP_SPEC (e.g. relaykernel==" + __version__
                        + ", a wheel URL) instead of carrying this version's VM side in the cell (the default: "
                        "nothing is installed and no package index is used)")
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
    """The cell's Python source: the settings, this relaykernel's VM side (or a pip install), then run them."""
    arguments: dict[str, Any] = {
        "platform": platform, "relay": relay, "remote_port": remote_port, "authorized_keys": authorized_keys,
        "storage_dir": storage_dir, "sshd_port": sshd_port, "ssh_options": list(ssh_options or []),
        "laptop_alias": laptop_alias, "state_dir": state_dir, **kernel_side,
    }
    settings_for(**arguments)  # what can be checked here must not fail on the VM
    lines = [
        f"# relaykernel {__version__}: connect this {PLATFORMS[platform].title} VM to the relay {relay}",
        f"# Runs sshd on the VM's 127.0.0.1:{sshd_port} (its own when root, else the one already there), keeps its",
        f"# keys in {storage_dir or PLATFORMS[platform].storage_dir}, keeps a reverse tunnel to the relay up and",
        "# shows a live status. Interrupt the cell to take the tunnel down (generated by `relaykernel cell`).",
    ]
    if platform == "colab" and not storage_dir:
        lines += ["from google.colab import drive", 'drive.mount("/content/drive")  # host keys outlive the VM there']
    lines += ["SETTINGS = dict(", *[f"    {name}={value!r}," for name, value in arguments.items()], ")"]
    lines += _pip_install(install) if install else _embedded_vm_side()
    lines += ["from relaykernel.vm.cell import run", "run(**SETTINGS)"]
    return "\n".join(lines) + "\n"


def _embedded_vm_side() -> list[str]:
    """relaykernel's VM side in one checked line: nothing is installed, the VM runs exactly this version."""
    payload = cell_payload()
    return [
        f"# relaykernel {__version__}'s VM side (standard library only), zlib + base64; sha256 {payload.sha256}",
        f"RELAYKERNEL_VM = {payload.line!r}",
        "import base64, hashlib, zlib",
        "program = zlib.decompress(base64.b64decode(RELAYKERNEL_VM))",
        f"if hashlib.sha256(program).hexdigest() != {payload.sha256!r}:",
        '    raise RuntimeError("relaykernel: this cell was damaged when copied: print it again (relaykernel cell)")',
        'exec(compile(program, "relaykernel-vm", "exec"), {"__name__": "relaykernel_vm"})',
    ]


def _pip_install(requirement: str) -> list[str]:
    """--install SPEC: pip-install relaykernel on the VM (for those who want it), unless this version is there."""
    return [
        "import importlib, subprocess, sys",
        "try:",
        "    from relaykernel import __version__ as installed",
        "except ImportError:",
        "    installed = None",
        f"if installed != {__version__!r}:  # the laptop's version: both sides speak the same protocol",
        f'    subprocess.run([sys.executable, "-m", "pip", "install", "-q", {requirement!r}], check=True)',
        '    sys.modules.pop("relaykernel", None)',
        "    importlib.invalidate_caches()",
    ]


def _kernel_side_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Heartbeat, work dir and checkpoint settings: the flags, else the kernelspec's config, else Jupyter config."""
    options = options_for(args, "cell", spec_dir=args.spec)
    chosen: dict[str, Any] = {}
    for name in ("heartbeat_seconds", "checkpoint_paths", "checkpoint_interval_seconds", "restore_on_start"):
        value = getattr(options, name)
        chosen[name] = list(value) if isinstance(value, list) else value
    if "remote_workdir" in options.sources and options.remote_workdir:  # one folder for every kernel
        chosen["workdir"] = options.remote_workdir
    else:  # one folder per project under the base: checkpoints reach into each of them
        if "remote_workdir_base" in options.sources:
            chosen["workdir"] = options.remote_workdir_base
        paths = chosen["checkpoint_paths"]
        chosen["checkpoint_paths"] = [*paths, *(f"*/{path}" for path in paths if not path.startswith("*/"))]
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
