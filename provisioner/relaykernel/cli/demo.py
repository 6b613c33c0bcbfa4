"""``relaykernel demo``: a relay and a VM on loopback, a kernel through them, a notebook run on it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

from ..kernelspec import build_kernel_json, install_kernelspec

VM_HOSTNAME = "relaykernel-demo-vm"  # as sandbox.netns names it (imported only when the demo runs)

if TYPE_CHECKING:  # the sandbox runs OpenSSH servers (POSIX only): imported when the demo runs, not with the CLI
    from ..sandbox.topology import SandboxInfo

SPEC_NAME = "relaykernel-sandbox"
DISPLAY_NAME = "Python on the relaykernel sandbox VM"
LOCAL_MODULE = "def greeting():\n    return 'hello from a module in your local folder, synced to the VM'\n"
CELLS = (
    "import getpass, os, platform, sys\n"
    "print('remote host:', platform.node())\n"
    "print('remote user:', getpass.getuser())\n"
    "print('remote cwd: ', os.getcwd())\n"
    "print('python:     ', sys.executable, platform.python_version())",
    "squares = sum(i * i for i in range(10**6))\nprint('computed on the VM:', squares)",
    "import mymodule\nprint(mymodule.greeting())",
    "import os\nprint('session at the VM sshd (from ip port, to ip port):', os.environ.get('SSH_CONNECTION'))",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run a notebook on a local sandbox relay + VM (no root needed)")
    parser.add_argument(
        "--keep", action="store_true",
        help="keep the sandbox running and its kernelspec installed until Ctrl-C, to try it from JupyterLab",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..sandbox.netns import NamespaceSandbox, why_not_available  # noqa: PLC0415 - see above
    from ..sandbox.topology import LoopbackSandbox  # noqa: PLC0415

    why_not = why_not_available()
    sandbox = LoopbackSandbox() if why_not else NamespaceSandbox()
    where = f"all on 127.0.0.1 ({why_not}: no network namespace for the VM)" if why_not else \
        "the VM in a network namespace of its own"
    print(f"starting a relay sshd, a VM sshd and the VM's reverse tunnel, {where} …", flush=True)
    with sandbox as info:
        for line in route(info):
            print(line, flush=True)
        config = _relay_config(info)
        status = _keep(config, info) if args.keep else _run_notebook(config)
    print("\nsandbox stopped; nothing left running.")
    return status


def route(info: SandboxInfo) -> list[str]:
    """The path a kernel takes, hop by hop, and plainly what this sandbox simulates."""
    lines = [
        "route: laptop (this process, paramiko)",
        f"  -> relay sshd {info.relay} (ssh config alias {info.relay_alias})",
        f"  -> the relay's 127.0.0.1:{info.forward_port}, reverse-forwarded by the VM's own `ssh -R` to the relay",
        f"  -> VM sshd 127.0.0.1:{info.vm_sshd_port} as {info.vm_user} (alias {info.vm_alias}, reached only via the "
        "relay)",
    ]
    if info.netns:
        lines.append(f"the VM is network namespace {info.netns}: only its own loopback, hostname {VM_HOSTNAME}; it "
                     "reaches the relay only through a unix-socket bridge, as a real VM reaches it over the internet")
    else:
        lines.append("simulated: the relay and the VM are two OpenSSH servers on this machine's loopback, run as "
                     "you; on a real VM the tunnel crosses the internet")
    return lines + ["the first cell shows the VM's host name, the last the kernel's session arriving at the VM sshd"]


def _relay_config(info: SandboxInfo) -> dict[str, Any]:
    local = os.path.join(info.state_dir, "laptop", "project")  # mirrored into the kernel's work dir
    os.makedirs(local, exist_ok=True)
    with open(os.path.join(local, "mymodule.py"), "w") as module:
        module.write(LOCAL_MODULE)
    return {
        "host": info.vm_alias,
        "ssh_config_file": info.ssh_config_file,
        "remote_python": info.vm_python,
        "remote_workdir": os.path.join(info.state_dir, "vm-work"),
        "sync_local_dir": local,
    }


def _run_notebook(config: dict[str, Any]) -> int:
    import nbformat  # nbformat's schema check costs ~2 s to import: only the demo pays it, never launch
    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory(prefix="relaykernel-demo-") as jupyter_dir:
        spec_dir = os.path.join(jupyter_dir, "kernels", SPEC_NAME)
        os.makedirs(spec_dir)
        with open(os.path.join(spec_dir, "kernel.json"), "w") as handle:
            json.dump(build_kernel_json(display_name=DISPLAY_NAME, config=config), handle)
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [jupyter_dir, os.environ.get("JUPYTER_PATH")]))
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code) for code in CELLS])
        started = time.monotonic()
        NotebookClient(notebook, timeout=60, kernel_name=SPEC_NAME).execute()
        print(f"ran {len(CELLS)} cells on the sandbox VM in {time.monotonic() - started:.2f} s:\n")
        for cell in notebook.cells:
            for output in cell.outputs:
                print(_output_text(output), end="")
    return 0


def _output_text(output: Any) -> str:
    if output.output_type == "stream":
        return output.text
    if output.output_type == "error":
        return f"{output.ename}: {output.evalue}\n"
    return output.get("data", {}).get("text/plain", "") + "\n"


def _keep(config: dict[str, Any], info: SandboxInfo) -> int:
    path = install_kernelspec(
        name=SPEC_NAME, kernel_json=build_kernel_json(display_name=DISPLAY_NAME, config=config), user=True
    )
    print(f"\ninstalled kernelspec {SPEC_NAME!r} in {path}")
    print(f"ssh config: {info.ssh_config_file} (Host {info.relay_alias} is the relay, Host {info.vm_alias} the VM "
          f"through it; e.g. ssh -F {info.ssh_config_file} {info.vm_alias})")
    print(f"check the path hop by hop: relaykernel doctor {SPEC_NAME}")
    print(f"start JupyterLab (jupyter lab) and pick {DISPLAY_NAME!r} in Kernel → Change Kernel…")
    print("press Ctrl-C here to stop the sandbox and remove the kernelspec", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return 0
