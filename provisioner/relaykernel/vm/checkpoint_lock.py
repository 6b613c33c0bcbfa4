"""One checkpoint or restore of a store at a time: an flock beside the store, or on the VM when it cannot lock."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..common.errors import VM, CheckpointError
from .private import private_dir

LOCK_NAME = ".lock"
LOCAL_LOCKS = "~/.relaykernel/locks"  # for storage that refuses flock (some FUSE mounts)
_POLL_SECONDS = 0.05


@contextlib.contextmanager
def store_lock(storage: Path, timeout_seconds: float) -> Iterator[None]:
    """Hold the store's lock for the block; CheckpointError if another run holds it past TIMEOUT_SECONDS."""
    private_dir(storage)  # its copies of the outputs are the user's: only the user may list them
    descriptor = _open_lockable(storage)
    try:
        deadline = time.monotonic() + timeout_seconds
        while not _try_lock(descriptor):
            if time.monotonic() >= deadline:
                held = f"another checkpoint held the store for {timeout_seconds:.0f} s"
                raise CheckpointError(VM, str(storage), held, "wait for it (see the heartbeat cell), then try again")
            time.sleep(_POLL_SECONDS)
        yield
    finally:
        os.close(descriptor)  # closing the descriptor releases the lock


def _open_lockable(storage: Path) -> int:
    """A descriptor flock works on: the lock file beside the store, else one on the VM's own disk."""
    import fcntl  # the VM is Linux; the laptop imports this module too (relaykernel cell), Windows included

    descriptor = os.open(storage / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return descriptor
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return descriptor  # it locks: someone holds it
        os.close(descriptor)
    local = private_dir(Path(os.path.expanduser(LOCAL_LOCKS)))
    name = hashlib.sha256(str(storage.resolve()).encode()).hexdigest()[:24] + ".lock"
    return os.open(local / name, os.O_RDWR | os.O_CREAT, 0o600)


def _try_lock(descriptor: int) -> bool:
    import fcntl  # see _open_lockable

    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True
