"""What a pass must do, decided from both sides' state: what to send, what is already there, moves and deletes."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .ignore import LocalFile
from .remote import RemoteListing
from .stream import sha256_of

BATCH_BYTES = 64 << 20


def source_for(local_root: Path) -> str:
    """Who wrote a file on the VM: this machine and this local folder (the VM's manifest keys entries by it)."""
    return hashlib.sha256(f"{socket.gethostname()}:{local_root.resolve()}".encode()).hexdigest()[:16]


@dataclass
class InitialPlan:
    """The first pass: files to send (small first), same-content files to adopt, deletes, and conflicts."""

    send: list[LocalFile] = field(default_factory=list)
    adopt: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> (mtime_ns, sha256)
    synced: dict[str, tuple[int, int]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # deleted here, changed on the VM since we wrote it


def plan_initial(local_root: Path, local: dict[str, LocalFile], remote: RemoteListing,
                 remote_hashes: Callable[[list[str]], dict[str, str]],
                 local_hash: Callable[[str], str | None] | None = None) -> InitialPlan:
    """Trust size and mtime only where the manifest says this folder wrote that very file; else compare hashes."""
    plan = InitialPlan()
    ask: list[str] = []
    local_hash = local_hash or (lambda path: sha256_of(local_root / path))
    for path, file in local.items():
        there, mine, here = remote.files.get(path), remote.manifest.get(path), (file.size, file.mtime_ns)
        if there is None or there[0] != file.size:
            plan.send.append(file)
        elif mine is not None and mine[:2] == there and here == there:
            plan.synced[path], plan.hashes[path] = there, mine[2]  # we wrote it, neither side changed it since
        elif mine is not None and mine[:2] == there:
            _compare(plan, file, local_hash(path), mine[2])  # the VM's copy is ours: its hash is known
        else:
            ask.append(path)
    theirs = remote_hashes(ask)
    for path in ask:
        _compare(plan, local[path], local_hash(path), theirs.get(path))
    for path, (size, mtime_ns, _) in sorted(remote.manifest.items()):
        there = remote.files.get(path)
        if path in local or there is None or (local_root / path).exists():
            continue  # still here (perhaps ignored now), or already gone there
        if there == (size, mtime_ns):
            plan.deletes.append(path)  # deleted here while no kernel ran; unchanged on the VM since we wrote it
        else:
            plan.conflicts.append(path)
    plan.send.sort(key=lambda file: (file.size, file.path))  # small files first: the first cell needs them soonest
    return plan


class AheadHashes:
    """Local hashes computed ahead, while the VM lists and hashes its side; ``keep_only`` drops the needless ones.

    In a pool of two threads (hashlib runs outside the GIL); a hash asked for later is computed then if not yet done.
    """

    def __init__(self, local_root: Path, paths: Iterable[str]) -> None:
        self.local_root = local_root
        self._wanted: set[str] | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="relaykernel-sync-hash")
        self._futures: dict[str, Future[str | None]] = {path: self._pool.submit(self._hash, path) for path in paths}

    def keep_only(self, paths: set[str]) -> None:
        """Only these hashes are still wanted (the VM said which files it could not vouch for)."""
        with self._lock:
            self._wanted = paths

    def close(self) -> None:
        self.keep_only(set())
        self._pool.shutdown(wait=True)

    def __call__(self, path: str) -> str | None:
        future = self._futures.get(path)
        done = future.result() if future is not None else None
        return done if done is not None else sha256_of(self.local_root / path)

    def _hash(self, path: str) -> str | None:
        with self._lock:
            wanted = self._wanted is None or path in self._wanted
        return sha256_of(self.local_root / path) if wanted else None


def _compare(plan: InitialPlan, file: LocalFile, here: str | None, remote_sha: str | None) -> None:
    if here is not None and here == remote_sha:
        plan.adopt[file.path] = (file.mtime_ns, here)
        plan.synced[file.path], plan.hashes[file.path] = (file.size, file.mtime_ns), here
    else:
        plan.send.append(file)


def find_moves(local_root: Path, files: Sequence[LocalFile], deletes: Sequence[str],
               synced: dict[str, tuple[int, int]], hashes: dict[str, str]) -> list[tuple[str, str]]:
    """(old, new) pairs: a deleted path whose size, mtime and content reappear under a new path (a rename)."""
    gone: dict[tuple[int, int], list[str]] = {}
    for path in deletes:
        if path in synced and path in hashes:
            gone.setdefault(synced[path], []).append(path)
    moves = []
    for file in files:
        for old in gone.get((file.size, file.mtime_ns), []):
            if sha256_of(local_root / file.path) == hashes[old]:
                moves.append((old, file.path))
                gone[(file.size, file.mtime_ns)].remove(old)
                break
    return moves


def batches(files: Sequence[LocalFile], limit: int = BATCH_BYTES) -> Iterable[Sequence[LocalFile]]:
    """Consecutive runs of files of at most ``limit`` bytes (a bigger file is a batch of its own)."""
    start, size = 0, 0
    for index, file in enumerate(files):
        if index > start and size + file.size > limit:
            yield files[start:index]
            start, size = index, 0
        size += file.size
    if start < len(files):
        yield files[start:]
