"""``relaykernel launch``: the kernelspec's argv, for clients that spawn kernels themselves (VS Code)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import uuid
from typing import Any

from ..common.errors import ConfigError
from ..common.protocol import PORT_NAMES as KERNEL_PORT_NAMES
from ..logs import step
from ..portable import on_stop_signals, pid_alive
from ..relayed import RelayedKernel
from ..sync.attach import sync_hooks
from .options_args import add_flags, options_for

_WATCH_SECONDS = 0.5
log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "launch", help="run as the kernel process a client spawned (kernelspec argv)", allow_abbrev=False,
        epilog="Arguments it does not know are the client's, for the kernel: they reach the remote ipykernel.",
    )
    parser.add_argument("-f", "--connection-file", required=True, help="the connection file the client wrote")
    parser.add_argument("--spec", help="kernelspec directory whose provisioner config to use")
    add_flags(parser, "launch")
    # Clients append their own arguments to a kernel's argv (VS Code: argv items after the spec's; `jupyter run`
    # adds its file names): they are the client's business with the kernel, so they go on to the remote ipykernel.
    parser.set_defaults(run=run, accepts_extra_arguments=True)


def run(args: argparse.Namespace) -> int:
    if args.extra_arguments:
        log.debug("arguments for the remote kernel: %s", args.extra_arguments)
    options = options_for(args, "launch", spec_dir=args.spec)
    options.require_host()
    info = read_connection_file(args.connection_file)
    sync_dir = options.sync_dir(os.getcwd())
    relayed = RelayedKernel(options, kernel_id=uuid.uuid4().hex, sync_dir=sync_dir,
                            kernel_arguments=args.extra_arguments, hooks=sync_hooks(options, sync_dir))
    ended = threading.Event()
    _install_signal_handlers(relayed, ended)
    local_ports = {name: int(info[name]) for name in KERNEL_PORT_NAMES}
    try:
        with step("binding the five local ports"):
            relayed.listen(local_ports)  # the client waits for shell and iopub to accept: let them at once
        with step(f"starting the kernel on {options.host}"):
            relayed.start(
                key=info["key"].encode(), signature_scheme=info.get("signature_scheme", "hmac-sha256"),
                local_ports=local_ports,
            )
        return _supervise(relayed, ended)
    finally:
        relayed.close()


def read_connection_file(path: str) -> dict[str, Any]:
    """The client's connection info; the path may arrive wrapped in literal quotes (VS Code, spaces)."""
    path = path.strip().strip("'\"")
    try:
        with open(path) as handle:
            info = json.load(handle)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the connection file {path}: {error}") from None
    missing = [name for name in (*KERNEL_PORT_NAMES, "key") if name not in info]
    if missing:
        raise ConfigError(f"connection file {path} lacks {', '.join(missing)}")
    if info.get("transport", "tcp") != "tcp":
        raise ConfigError(f"connection file {path}: only the tcp transport can be forwarded")
    return info


def _install_signal_handlers(relayed: RelayedKernel, ended: threading.Event) -> None:
    def interrupt(signum: int, frame: object) -> None:
        threading.Thread(target=_forward_signal, args=(relayed, signal.SIGINT), daemon=True).start()

    def stop(signum: int, frame: object) -> None:
        ended.set()

    signal.signal(signal.SIGINT, interrupt)
    on_stop_signals(stop)


def _forward_signal(relayed: RelayedKernel, signum: int) -> None:
    try:
        relayed.signal(signum)
    except Exception as error:  # noqa: BLE001 - a failed interrupt must not end the launcher
        print(f"relaykernel: interrupt not delivered: {error}", file=sys.stderr)


def _supervise(relayed: RelayedKernel, ended: threading.Event) -> int:
    parent = os.getppid()
    watched = int(os.environ.get("JPY_PARENT_PID", "0") or 0)
    while not ended.wait(_WATCH_SECONDS):
        status = relayed.poll()
        if status is not None:
            print(f"relaykernel: the kernel on the VM exited with status {status}", file=sys.stderr)
            return status if status >= 0 else 128 - status
        if os.getppid() != parent or (watched and not pid_alive(watched)):
            return 0
    return 0
