"""The ``relaykernel`` command: one subcommand per module, errors printed as their fix, not a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..common.errors import RelayKernelError
from ..ssh.chain import TRANSPORT_LOGGER
from . import cell, checkpoint, demo, doctor, install, launch, sync, trust

SUBCOMMANDS = (install, launch, doctor, trust, sync, checkpoint, demo, cell)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relaykernel",
        description="Jupyter kernels on a notebook VM with no public IP, reached through an SSH relay.",
    )
    parser.add_argument("--debug", action="store_true", help="log every step (to stderr)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_arguments = extra
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="relaykernel %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("paramiko", TRANSPORT_LOGGER):  # every failure that matters reaches the user as an error
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.debug else logging.CRITICAL)
    try:
        return int(args.run(args) or 0)
    except RelayKernelError as error:
        print(f"relaykernel: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug: still a short paragraph (VS Code shows stderr), the traceback on demand
        if args.debug:
            raise
        print(f"relaykernel: unexpected {type(error).__name__}: {error}\n"
              "  fix: rerun with --debug for the traceback, and please report it", file=sys.stderr)
        return 1
