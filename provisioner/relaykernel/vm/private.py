"""Files and folders only their owner may read: written so, and tightened (with a note) when found looser."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO

PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700


def private_dir(path: Path, note: Callable[[str], None] | None = None) -> Path:
    """Make PATH a folder, missing parents included (each made 0700); PATH itself ends 0700."""
    missing = [path, *[parent for parent in path.parents if not parent.exists()]]
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True, mode=PRIVATE_DIR)
    tighten(path, PRIVATE_DIR, note)
    return path


def write_private(path: Path, data: bytes | str) -> Path:
    """Write PATH whole (a staging file renamed over it), mode 0600 from the first byte."""
    private_dir(path.parent)
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(handle.fileno(), PRIVATE_FILE)  # a leftover staging file may have had other bits
        handle.write(data.encode() if isinstance(data, str) else data)
    os.replace(staging, path)
    return path


def append_private(path: Path, text: str) -> None:
    """Append TEXT to PATH, creating it 0600."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE)
    with os.fdopen(descriptor, "a") as handle:
        handle.write(text)


def open_private_log(path: Path) -> IO[str]:
    """PATH opened for appending, 0600 (what other programs, ssh or sshd, write to)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE)
    return os.fdopen(descriptor, "a")


def tighten(path: Path, mode: int, note: Callable[[str], None] | None = None) -> bool:
    """Take away every permission beyond MODE from PATH; True (and a note) if there was one to take."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return False
    if current & ~mode == 0:
        return False
    try:
        path.chmod(current & mode)
    except OSError as error:  # storage that has no modes (some FUSE mounts): nothing more to do here
        if note is not None:
            note(f"{path} is mode {current:04o} and cannot be changed: {error.strerror or error}")
        return False
    if note is not None:
        still = stat.S_IMODE(path.stat().st_mode)
        outcome = f"now {still:04o}" if still & ~mode == 0 else f"still {still:04o}: this storage ignores modes"
        note(f"{path} was mode {current:04o}, readable by others: {outcome}")
    return True


def tighten_tree(root: Path, note: Callable[[str], None] | None = None) -> None:
    """Every folder below ROOT (and ROOT) 0700, every file 0600."""
    if not root.is_dir():
        return
    tighten(root, PRIVATE_DIR, note)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            tighten(Path(folder, name), PRIVATE_DIR, note)
        for name in files:
            tighten(Path(folder, name), PRIVATE_FILE, note)
