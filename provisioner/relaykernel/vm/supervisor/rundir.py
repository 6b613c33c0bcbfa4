"""The kernel's private run dir on the VM, the note that outlives it, and the supervisor's log file."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time

from ...common.protocol import CONTROL_SOCKET
from .protocol import RequestError

CONNECTION_FILE = "kernel.json"
KERNEL_LOG = "kernel.log"
SUPERVISOR_LOG = "supervisor.log"
ENDED_SUFFIX = ".ended"
ENDED_MAX_AGE_SECONDS = 86400.0

log = logging.getLogger("relaykernel.supervisor")


class RunDir:
    """The kernel's private directory <run_root>/<kernel_id>, and the .ended note that outlives it."""

    def __init__(self, run_root: str, kernel_id: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(run_root))
        self.kernel_id = kernel_id
        self.path = os.path.join(self.root, kernel_id)
        self.ended_path = self.path + ENDED_SUFFIX

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def connect(self) -> socket.socket:
        """Connect to the live supervisor's control socket; OSError when there is none."""
        os.chdir(self.path)  # a relative address dodges the 108-byte limit on unix socket paths
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(CONTROL_SOCKET)
        except OSError:
            client.close()
            raise
        return client

    def has_live_supervisor(self) -> bool:
        try:
            self.connect().close()
        except OSError:
            return False
        return True

    def create(self) -> None:
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            shutil.rmtree(self.path, ignore_errors=True)  # left by a supervisor that was SIGKILLed
            os.mkdir(self.path, 0o700)
            os.chmod(self.path, 0o700)
        except OSError as exc:
            msg = f"cannot create the run dir {self.path}: {exc.strerror}; set run_root to a writable place"
            raise RequestError("request", msg) from None
        self.forget_old_endings()

    def forget_old_endings(self) -> None:
        cutoff = time.time() - ENDED_MAX_AGE_SECONDS
        for entry in os.scandir(self.root):
            try:
                if entry.name.endswith(ENDED_SUFFIX) and (
                    entry.path == self.ended_path or entry.stat().st_mtime < cutoff
                ):
                    os.unlink(entry.path)
            except OSError:  # another supervisor removed it first
                pass

    def record_ending(self, summary: str) -> None:
        try:
            with os.fdopen(os.open(self.ended_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as note:
                note.write(summary + "\n")
        except OSError:
            log.exception("cannot write %s", self.ended_path)

    def ending(self) -> str:
        try:
            with open(self.ended_path) as note:
                return "gone: " + note.read().strip()
        except OSError:
            return f"gone: no supervisor for kernel {self.kernel_id} under {self.root}"

    def remove(self) -> None:
        for name in (CONNECTION_FILE, CONTROL_SOCKET):  # the connection file holds the key: make sure it goes
            with contextlib.suppress(OSError):
                os.unlink(self.file(name))
        shutil.rmtree(self.path, ignore_errors=True)


def start_logging(run_dir: RunDir) -> None:
    os.close(os.open(run_dir.file(SUPERVISOR_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    handler = logging.FileHandler(run_dir.file(SUPERVISOR_LOG))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def stop_logging() -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
