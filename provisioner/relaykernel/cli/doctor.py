"""``relaykernel doctor DEST``: one line per hop and check, the fix on failure, non-zero exit on failure."""

from __future__ import annotations

import argparse

from ..doctor import run_checks
from ..options import RelayOptions
from .options_args import add_connection_flags, given_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("doctor", help="check each hop to the VM and say what to fix")
    parser.add_argument("host", metavar="DEST", help=RelayOptions.class_traits()["host"].help)
    add_connection_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = RelayOptions(host=args.host, **given_options(args))
    failed = False
    for check in run_checks(options):
        mark = "ok  " if check.ok else "FAIL"
        print(f"{mark} {check.name:<28} {check.detail}", flush=True)
        if not check.ok:
            failed = True
            if check.fix:
                print(f"     fix: {check.fix}", flush=True)
    return 1 if failed else 0
