"""``relaykernel doctor NAME``: one line per hop and check, the fix on failure, non-zero exit on failure.

NAME is an installed relaykernel kernelspec (its host, jump, ssh config, identity, remote python and work dir are
used) or, when no such kernelspec exists, the VM's destination (an ssh config alias or user@host:port).
"""

from __future__ import annotations

import argparse
import logging
import time

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from ..common.errors import ConfigError
from ..doctor import run_checks
from ..kernelspec import PROVISIONER_NAME, load_kernel_json
from ..options import RelayOptions
from .options_args import add_flags, options_for

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("doctor", help="check each hop to the VM and say what to fix")
    parser.add_argument("name", metavar="NAME", help="an installed relaykernel kernelspec, or the VM's "
                        "destination: " + RelayOptions.class_traits()["host"].help)
    parser.add_argument("--spec", metavar="KERNELSPEC_DIR",
                        help="take the settings from this kernelspec directory (one outside Jupyter's path)")
    add_flags(parser, "doctor")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    spec_dir = args.spec or installed_spec(args.name)
    if spec_dir:
        check_relay_spec(spec_dir)
        options, source = options_for(args, "doctor", spec_dir=spec_dir), f"kernelspec {spec_dir}"
    else:
        options, source = options_for(args, "doctor", host=args.name), "a destination: no kernelspec has that name"
    jump = f" via {options.jump}" if options.jump else ""
    print(f"checking {options.require_host()}{jump} ({source}), remote python {' '.join(options.python_argv())}, "
          f"work dir {options.kernel_workdir(None)}", flush=True)
    failed = False
    started = time.monotonic()
    for check in run_checks(options):
        log.debug("check %r: %s in %.3f s", check.name, "ok" if check.ok else "FAIL", time.monotonic() - started)
        started = time.monotonic()
        mark = ("WARN" if check.warn else "ok  ") if check.ok else "FAIL"
        print(f"{mark} {check.name:<28} {check.detail}", flush=True)
        failed = failed or not check.ok
        if check.fix and (check.warn or not check.ok):
            print(f"     fix: {check.fix}", flush=True)
    return 1 if failed else 0


def installed_spec(name: str) -> str | None:
    """The folder of the installed kernelspec NAME, or None."""
    try:
        return str(KernelSpecManager().get_kernel_spec(name).resource_dir)
    except NoSuchKernel:
        return None


def check_relay_spec(spec_dir: str) -> None:
    """ConfigError unless SPEC_DIR is a relaykernel kernelspec that names its VM."""
    provisioner = load_kernel_json(spec_dir).get("metadata", {}).get("kernel_provisioner", {})
    if provisioner.get("provisioner_name") != PROVISIONER_NAME:
        raise ConfigError(f"kernelspec {spec_dir} does not run on a VM through relaykernel: name a relaykernel "
                          "kernelspec (jupyter kernelspec list) or the VM's ssh destination")
    if not provisioner.get("config", {}).get("host"):
        raise ConfigError(f"kernelspec {spec_dir} names no host: reinstall it with relaykernel install --host DEST")
