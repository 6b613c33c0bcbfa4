"""``relaykernel checkpoint DEST now | list | restore [--id ID]``: the VM's checkpoints, from the laptop."""

from __future__ import annotations

import argparse
import json
import time

from ..bundle import vm_program
from ..common.errors import VM, CheckpointError
from ..options import RelayOptions
from ..relayed import build_chain
from .options_args import add_flags, options_for


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("checkpoint", help="checkpoint the VM's outputs now, list or restore checkpoints")
    parser.add_argument("host", metavar="DEST", help=RelayOptions.class_traits()["host"].help)
    parser.add_argument("action", choices=("now", "list", "restore"))
    parser.add_argument("--id", default="", help="the checkpoint to restore (default: the latest)")
    add_flags(parser, "checkpoint")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = options_for(args, "checkpoint", host=args.host)
    chain = build_chain(options)
    try:
        chain.connect()
        status, stdout, stderr = chain.run_program(options.python_argv(), vm_program("relaykernel.vm.checkpoint"),
                                                   [args.action, args.id], options.command_timeout_seconds * 10)
    finally:
        chain.close()
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        problem = f"the VM could not run its checkpointer (exit {status}): {stderr.strip()[-300:]}"
        raise CheckpointError(VM, chain.vm_label, problem, "check remote_python (Python 3.8 or newer)") from None
    if "error" in result:
        raise CheckpointError(VM, chain.vm_label, result["error"], "see the VM's heartbeat cell")
    print(_describe(args.action, result))
    return 0


def _describe(action: str, result: dict) -> str:
    if action == "now":
        return f"checkpoint {result['id']}: {result['files']} file(s), {result['copied_bytes'] / 1e6:.1f} MB copied"
    if action == "list":
        rows = [f"{c['id']}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(c['created']))}  {c['files']:>6} "
                f"file(s)  {c['bytes'] / 1e6:8.1f} MB" for c in result["checkpoints"]]
        return "\n".join(rows) or "no checkpoints yet"
    kept = result["kept_newer"]
    return f"restored {len(result['restored'])} file(s)" + (f"; kept {len(kept)} newer here: {kept}" if kept else "")
