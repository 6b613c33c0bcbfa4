"""``relaykernel doctor DEST``: one line per hop and check, the fix on failure, non-zero exit on failure."""

from __future__ import annotations

import argparse
import logging
import time

from ..doctor import run_checks
from ..options import RelayOptions
from .options_args import add_flags, options_for

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("doctor", help="check each hop to the VM and say what to fix")
    parser.add_argument("host", metavar="DEST", help=RelayOptions.class_traits()["host"].help)
    add_flags(parser, "doctor")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = options_for(args, "doctor", host=args.host)
    failed = False
    started = time.monotonic()
    for check in run_checks(options):
        log.debug("check %r: %s in %.3f s", check.name, "ok" if check.ok else "FAIL", time.monotonic() - started)
        started = time.monotonic()
        mark = "ok  " if check.ok else "FAIL"
        print(f"{mark} {check.name:<28} {check.detail}", flush=True)
        if not check.ok:
            failed = True
            if check.fix:
                print(f"     fix: {check.fix}", flush=True)
    return 1 if failed else 0
