"""The ``relaykernel`` command: one subcommand per module, errors printed as their fix, not a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__, logs
from ..common.errors import RelayKernelError
from . import cell, checkpoint, demo, doctor, install, launch, sync, trust

SUBCOMMANDS = (install, launch, doctor, trust, sync, checkpoint, demo, cell)
_DEBUG_HELP = "log every step with its timing, and the options in effect with where each came from (to stderr)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relaykernel",
        description="Jupyter kernels on a notebook VM with no public IP, reached through an SSH relay.",
    )
    parser.add_argument("--version", action="version", version=f"relaykernel {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    for sub in subparsers.choices.values():  # `relaykernel doctor x --debug` works as well as `--debug doctor x`
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_arguments = extra
    logs.configure_cli(debug=args.debug)
    try:
        with logs.step(f"relaykernel {args.command}"):
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
