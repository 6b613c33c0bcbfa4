"""relaykernel's log lines: time, level and name on every front, the Jupyter server's level, and timed steps."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

ROOT = "relaykernel"
FORMAT = "[%(levelname)1.1s %(asctime)s.%(msecs)03d %(name)s] %(message)s"  # the Jupyter server's own layout
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
NOISY = ("paramiko",)  # every failure that matters reaches the user as a relaykernel error

_step_log = logging.getLogger(f"{ROOT}.step")
_handler: logging.Handler | None = None


def formatter() -> logging.Formatter:
    """The one layout for relaykernel's records."""
    return logging.Formatter(FORMAT, DATE_FORMAT)


def configure_cli(*, debug: bool) -> None:
    """The command line: warnings only, or (``--debug``) every step with its timing; all on stderr."""
    level = logging.DEBUG if debug else logging.WARNING
    _attach(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.CRITICAL)
    from .ssh.chain import TRANSPORT_LOGGER  # noqa: PLC0415 - importing paramiko only when a command runs

    logging.getLogger(TRANSPORT_LOGGER).setLevel(logging.DEBUG if debug else logging.CRITICAL)


def follow_application_log(app_log: logging.Logger | logging.LoggerAdapter) -> None:
    """Inside a Jupyter server (or any traitlets app): relaykernel's records at the app's level, in its layout.

    The server's own logger does not propagate to ours, so without this our lines reach Python's last-resort
    handler: warnings only, bare text with no time, level or source.
    """
    logger = app_log.logger if isinstance(app_log, logging.LoggerAdapter) else app_log
    if logger.name == "traitlets":  # no application (a bare KernelManager, nbclient): its host configures logging
        return
    _attach(logger.getEffectiveLevel())


def _attach(level: int) -> None:
    global _handler
    root = logging.getLogger(ROOT)
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(formatter())
        root.addHandler(_handler)
    root.setLevel(level)
    _handler.setLevel(level)


@contextmanager
def step(what: str, logger: logging.Logger | None = None) -> Iterator[None]:
    """Log ``what`` when it starts and, at debug level, how long it took (or after how long it failed)."""
    log = logger or _step_log
    started = time.monotonic()
    log.debug("%s …", what)
    try:
        yield
    except BaseException as error:
        log.debug("%s: failed after %.3f s (%s)", what, time.monotonic() - started, type(error).__name__)
        raise
    log.debug("%s: done in %.3f s", what, time.monotonic() - started)
