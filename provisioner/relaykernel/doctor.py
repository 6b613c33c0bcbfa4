"""Check the path to the VM hop by hop and say, for the first failure, what to fix."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass

from .common.errors import AuthError, ConnectError, ForwardRefused, HostKeyError, RelayKernelError
from .options import RelayOptions
from .relayed import build_chain
from .ssh.chain import SSHChain, describe

_PYTHON_CHECK = (
    "import sys, ipykernel, importlib.util as u; "
    "print(sys.version.split()[0], ipykernel.__version__, 'yes' if u.find_spec('debugpy') else 'no')"
)
_WORKDIR_CHECK = (
    "import os, sys, tempfile; d = os.path.expanduser(sys.argv[1]); os.makedirs(d, exist_ok=True); "
    "tempfile.TemporaryFile(dir=d).close(); print(os.path.abspath(d))"
)
_GPU_CHECK = "nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true"


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def run_checks(options: RelayOptions) -> Iterator[Check]:
    """Every check in path order; stops after the first failure (later ones cannot run)."""
    chain = build_chain(options)
    try:
        for index in range(len(chain.hops)):
            checks = list(_hop_checks(chain, index))
            yield from checks
            if not all(check.ok for check in checks):
                return
        yield from _vm_checks(chain, options)
    finally:
        chain.close()


def _hop_checks(chain: SSHChain, index: int) -> Iterator[Check]:
    hop, name = chain.hops[index], chain.hop_name(index)
    reach = "forwarded port open" if index and index == len(chain.hops) - 1 else "reachable"
    where = describe(hop)
    try:
        chain.connect(index + 1)
    except (ConnectError, ForwardRefused) as error:
        yield Check(f"{name} {reach}", False, error.problem, error.fix)
        return
    except HostKeyError as error:
        yield Check(f"{name} {reach}", True, where)
        yield Check(f"{name} host key", False, error.problem, error.fix)
        return
    except AuthError as error:
        yield Check(f"{name} {reach}", True, where)
        yield Check(f"{name} host key", True, "known")
        yield Check(f"{name} auth", False, error.problem, error.fix)
        return
    yield Check(f"{name} {reach}", True, where)
    yield Check(f"{name} host key", True, "known")
    yield Check(f"{name} auth", True, f"logged in as {hop.user}")


def _vm_checks(chain: SSHChain, options: RelayOptions) -> Iterator[Check]:
    python = shlex.join(options.python_argv())
    status, out, err = _run(chain, f"{python} -c {shlex.quote(_PYTHON_CHECK)}", options)
    if status != 0:
        yield Check("remote python + ipykernel", False, _last_line(err) or f"exit {status}", _python_fix(python, err))
        return
    version, ipykernel, debugpy = (out.split() + ["?", "?", "?"])[:3]
    yield Check("remote python + ipykernel", True, f"{python}: Python {version}, ipykernel {ipykernel}")
    debugger = ipykernel.split(".")[0].isdigit() and int(ipykernel.split(".")[0]) >= 6 and debugpy == "yes"
    yield Check("debugger (ipykernel >= 6 + debugpy)", True, "available" if debugger else
                f"not available: {python} -m pip install debugpy, or install the spec with --no-debugger")
    workdir = shlex.quote(options.kernel_workdir(None))
    status, out, err = _run(chain, f"{python} -c {shlex.quote(_WORKDIR_CHECK)} {workdir}", options)
    if status != 0:
        yield Check("remote work dir writable", False, _last_line(err), "choose another --remote-workdir")
        return
    yield Check("remote work dir writable", True, out.strip())
    status, out, _ = _run(chain, _GPU_CHECK, options)
    yield Check("GPU", True, "; ".join(out.strip().splitlines()) or "none visible (nvidia-smi absent or no GPU)")


def _run(chain: SSHChain, command: str, options: RelayOptions) -> tuple[int, str, str]:
    try:
        return chain.run(command, options.command_timeout_seconds)
    except RelayKernelError as error:
        return 255, "", str(error)


def _python_fix(python: str, stderr: str) -> str:
    if "No module named" in stderr:
        return f"install ipykernel on the VM: {python} -m pip install ipykernel"
    return "set --remote-python to the VM's Python 3 (e.g. /usr/bin/python3)"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
