"""``relaykernel sync DEST LOCAL REMOTE [--watch]``: mirror a local folder into a directory on the VM."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from ..common.errors import ConfigError
from ..options import RelayOptions
from ..relayed import build_chain
from ..sync.engine import SyncReport, WorkdirSync
from ..sync.ignore import IgnoreRules
from ..sync.remote import RemoteTree
from .options_args import add_flags, options_for


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sync", help="mirror a local folder into a directory on the VM")
    parser.add_argument("host", metavar="DEST", help=RelayOptions.class_traits()["host"].help)
    parser.add_argument("local", type=Path, help="the local folder")
    parser.add_argument("remote", help="the directory on the VM ('~' is the VM user's home)")
    parser.add_argument("--watch", action="store_true", help="keep syncing every change until Ctrl-C")
    add_flags(parser, "sync")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    local = args.local.expanduser().resolve()
    if not local.is_dir():
        raise ConfigError(f"{args.local} is not a folder here: name the local folder to mirror")
    options = options_for(args, "sync", host=args.host)
    chain = build_chain(options)
    try:
        chain.connect()
        remote = RemoteTree(chain, python_argv=options.python_argv(), root=args.remote,
                            timeout_seconds=options.command_timeout_seconds)
        rules = IgnoreRules(local, extra_patterns=list(options.sync_ignore),
                            max_file_size_bytes=int(options.sync_max_file_size_mb * 1e6))
        sync = WorkdirSync(local, remote, rules)
        report = sync.initial(progress=_progress)
        print(f"\nsynced {local} -> {args.host}:{args.remote}: {_summary(report)}", file=sys.stderr)
        if args.watch:
            _watch(sync)
        return 1 if report.errors else 0
    finally:
        chain.close()


def _watch(sync: WorkdirSync) -> None:
    print("watching for changes; Ctrl-C to stop", file=sys.stderr)
    sync.watch()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sync.stop()


def _progress(done: int, total: int, sent_bytes: int) -> None:
    width = 30
    filled = width * done // total if total else width
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} files, {sent_bytes / 1e6:.1f} MB",
          end="", file=sys.stderr, flush=True)


def _summary(report: SyncReport) -> str:
    text = f"{report.written} written, {report.deleted} deleted, {report.sent_bytes / 1e6:.1f} MB"
    for error in report.errors:
        text += f"\n  error: {error}"
    return text
