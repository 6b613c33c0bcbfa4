"""Check the path to the VM hop by hop and say, for the first failure, what to fix."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from dataclasses import dataclass

from .bundle import OLDEST_PYTHON, vm_program
from .common.errors import AuthError, ConnectError, ForwardRefused, HostKeyError, RelayKernelError
from .common.version import __version__, version_mismatch
from .options import RelayOptions
from .relayed import build_chain
from .ssh.chain import SSHChain, describe
from .ssh.relay_probe import probe_relay_listen

_OLDEST = ".".join(map(str, OLDEST_PYTHON))
@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False  # ok, but worth fixing: printed with its fix


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
    if index < len(chain.hops) - 1:
        yield Check(f"{name} key cannot listen", *probe_relay_listen(chain, index))


def _vm_checks(chain: SSHChain, options: RelayOptions) -> Iterator[Check]:
    """The VM's python, ipykernel, work dir and cell version, from one run of the probe (relaykernel.vm.probe)."""
    python = shlex.join(options.python_argv())
    status, out, err = _run(chain, "relaykernel.vm.probe", [options.kernel_workdir(None)], options)
    report = _last_json(out)
    if report is None:
        fix = f"set --remote-python to the VM's Python {_OLDEST} or newer (e.g. /usr/bin/python3)"
        yield Check("remote python + ipykernel", False, _last_line(err) or f"exit {status}", fix)
        return
    if report.get("ipykernel") is None:
        yield Check("remote python + ipykernel", False, f"{python}: Python {report['python']}, no ipykernel",
                    f"install ipykernel on the VM: {python} -m pip install ipykernel")
    else:
        ipykernel = str(report["ipykernel"])
        yield Check("remote python + ipykernel", True, f"{python}: Python {report['python']}, ipykernel {ipykernel}")
        major = ipykernel.split(".")[0]
        debugger = major.isdigit() and int(major) >= 6 and bool(report.get("debugpy"))
        yield Check("debugger (ipykernel >= 6 + debugpy)", True, "available" if debugger else "not available: "
                    "JupyterLab's debugger will not start", "" if debugger else f"{python} -m pip install debugpy, "
                    "or install the kernelspec with --no-debugger", warn=not debugger)
    if report.get("workdir_error"):
        yield Check("remote work dir writable", False, str(report["workdir_error"]),
                    "choose another --remote-workdir (or fix its owner and modes on the VM)")
    else:
        yield Check("remote work dir writable", True, str(report["workdir"]))
    yield _cell_check(report.get("cell"))
    yield Check("GPU", True, str(report.get("gpu") or "none visible (nvidia-smi absent or no GPU)"))


def _cell_check(info: dict | None) -> Check:
    if not info:
        return Check("VM cell version", True, "no cell info on the VM (set up without `relaykernel cell`?)")
    mismatch = version_mismatch(__version__, info)
    if mismatch:
        return Check("VM cell version", False, mismatch)
    return Check("VM cell version", True, f"relaykernel {info.get('relaykernel')} (protocol {info.get('protocol')})")


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        return found if isinstance(found, dict) else None
    return None


def _run(chain: SSHChain, entry: str, args: list[str], options: RelayOptions) -> tuple[int, str, str]:
    try:
        return chain.run_program(options.python_argv(), vm_program(entry), args, options.command_timeout_seconds)
    except RelayKernelError as error:
        return 255, "", str(error)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
