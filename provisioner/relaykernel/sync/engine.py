"""Mirror a local folder into the kernel's remote work dir: an initial sync of what differs, then live batches."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..common.errors import RelayKernelError
from .ignore import IgnoreRules, LocalFile
from .remote import RemoteTree
from .watcher import BatchWatcher

log = logging.getLogger(__name__)
_BATCH_BYTES = 64 << 20


@dataclass
class SyncReport:
    """What one pass did: files written and deleted on the VM, bytes sent, and what it would not do."""

    written: int = 0
    deleted: int = 0
    sent_bytes: int = 0
    refused_deletes: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    fetched: int = 0
    conflicts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class WorkdirSync:
    """One local folder and one remote work dir; every pass is serialized, failed paths are retried later."""

    def __init__(self, local_root: Path, remote: RemoteTree, rules: IgnoreRules, *, max_delete_count: int = 50,
                 max_delete_share: float = 0.5, rescan_seconds: float = 30.0, settle_seconds: float = 0.05) -> None:
        self.local_root = local_root
        self.remote = remote
        self.rules = rules
        self.max_delete_count = max_delete_count
        self.max_delete_share = max_delete_share
        self.rescan_seconds = rescan_seconds
        self.settle_seconds = settle_seconds
        self.synced: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) the VM has from us
        self._retry: set[str] = set()
        self._conflicts: dict[str, tuple[int, int]] = {}  # path -> the VM's state already kept beside it
        self._lock = threading.Lock()
        self._watcher: BatchWatcher | None = None
        self._stopping = threading.Event()
        self._rescanner = threading.Thread(target=self._rescan_loop, name="relaykernel-sync-rescan", daemon=True)

    def initial(self, progress: Callable[[int, int, int], None] | None = None) -> SyncReport:
        """Send every file whose size or mtime differs on the VM; delete nothing there (it may be output)."""
        with self._lock:
            remote = self.remote.listing()
            local = {file.path: file for file in self.rules.walk()}
            self.synced = {path: remote[path] for path in local if path in remote}
            todo = [file for path, file in sorted(local.items()) if remote.get(path) != (file.size, file.mtime_ns)]
            return self._push(todo, [], progress, defer_fresh=False)  # asked for now: send what is there

    def sync_paths(self, paths: Iterable[str]) -> SyncReport:
        """Bring these paths (changed, created, deleted or moved, files or directories) up to date on the VM.

        Every pass leaves a file written to within the last settle_seconds for a later one (``deferred``): a file
        still being written must not reach the VM half done.
        """
        with self._lock:
            files, deletes = self._changes(set(paths) | self._retry)
            self._retry.clear()
            return self._push(files, deletes)

    def rescan(self) -> SyncReport:
        """Catch what the watcher missed (dropped inotify events, coalesced ones): compare the tree with the VM."""
        with self._lock:
            local = {file.path: file for file in self.rules.walk()}
            files = [file for path, file in sorted(local.items()) if self.synced.get(path) != (file.size,
                                                                                                 file.mtime_ns)]
            return self._push(files, sorted(set(self.synced) - set(local)))

    def pull(self, output_dirs: Sequence[str]) -> SyncReport:
        """Bring files under output_dirs back from the VM; a file edited here since is kept, the VM's copy beside it."""
        prefixes = tuple(d.strip("/") + "/" for d in output_dirs if d.strip("/"))
        report = SyncReport()
        if not prefixes:
            return report
        with self._lock:
            remote = self.remote.listing()
            targets: dict[str, str] = {}
            for path, state in sorted(remote.items()):
                fresh = self.synced.get(path) != state and self._conflicts.get(path) != state
                if path.startswith(prefixes) and _safe(path) and fresh:
                    local = _state_of(self.local_root / path)
                    if local == state:
                        self.synced[path] = state
                    elif local is not None and self._edited_here(path, local, state):
                        targets[path] = _beside(path)  # keep both
                        report.conflicts.append(path)
                    else:
                        targets[path] = path
            if not targets:
                return report
            try:
                fetched = self.remote.fetch(self.local_root, targets)
            except RelayKernelError as error:
                report.errors.append(str(error))
                return report
            for file in fetched:
                self.synced[file.path] = (file.size, file.mtime_ns)  # so the watcher does not send it back
            for path in report.conflicts:
                self._conflicts[path] = remote[path]  # kept beside once; a later change on the VM comes again
            report.fetched = len(fetched)
        for path in report.conflicts:
            log.warning("sync: %s changed both here and on the VM; the VM's copy is %s", path, _beside(path))
        return report

    def _edited_here(self, path: str, local: tuple[int, int], remote: tuple[int, int]) -> bool:
        """Changed locally since the last sync, or (never synced) newer here than on the VM."""
        known = self.synced.get(path)
        return local != known if known is not None else local[1] > remote[1]

    def watch(self) -> WorkdirSync:
        """Sync each batch of filesystem events, and rescan every rescan_seconds, until stop()."""
        self._watcher = BatchWatcher(self.local_root, self._on_batch).start()
        self._rescanner.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.stop()
        if self._rescanner.is_alive():
            self._rescanner.join()

    def _on_batch(self, paths: set[str]) -> None:
        report = self.sync_paths(paths)
        self._report(report)
        if report.deferred and self._watcher is not None:
            self._watcher.requeue(set(report.deferred))

    def _rescan_loop(self) -> None:
        while not self._stopping.wait(self.rescan_seconds):
            self._report(self.rescan())

    def _changes(self, paths: set[str]) -> tuple[list[LocalFile], list[str]]:
        self.rules.forget(os.path.dirname(path) for path in paths if os.path.basename(path) == ".gitignore")
        files: dict[str, LocalFile] = {}
        deletes: set[str] = set()
        for path in sorted(paths):
            if self.rules.ignored(path):
                continue
            try:
                info = os.lstat(self.local_root / path)
            except FileNotFoundError:
                deletes.update(p for p in self.synced if p == path or p.startswith(path + "/"))
                continue
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):  # a directory moved in, or created with its files: look inside
                below = (f for f in self.rules.walk() if f.path.startswith(path + "/"))
                files.update((f.path, f) for f in below if self.synced.get(f.path) != (f.size, f.mtime_ns))
            elif (stat.S_ISREG(info.st_mode) and not self.rules.too_big(info.st_size)
                  and self.synced.get(path) != (info.st_size, info.st_mtime_ns)):
                files[path] = LocalFile(path, info.st_size, info.st_mtime_ns, info.st_mode & 0o777)
        return list(files.values()), sorted(deletes - set(files))

    def _push(self, files: Sequence[LocalFile], deletes: Sequence[str],
              progress: Callable[[int, int, int], None] | None = None, *, defer_fresh: bool = True) -> SyncReport:
        report = SyncReport()
        deletes = self._guard(list(deletes), report)
        newest_settled = time.time_ns() - int(self.settle_seconds * 1e9) if defer_fresh else time.time_ns() * 2
        report.deferred = [file.path for file in files if file.mtime_ns > newest_settled]
        self._retry.update(report.deferred)
        files = [file for file in files if file.mtime_ns <= newest_settled]
        batches = list(_batches(files)) or ([[]] if deletes else [])
        for index, batch in enumerate(batches):
            if self._stopping.is_set():  # stop() during a long pass: end at a batch boundary
                break
            self._send(batch, deletes if index == len(batches) - 1 else [], report)  # deletes go last
            if progress:
                progress(report.written, len(files), report.sent_bytes)
        return report

    def _send(self, files: Sequence[LocalFile], deletes: Sequence[str], report: SyncReport) -> None:
        try:
            result = self.remote.apply(self.local_root, files, deletes)
        except RelayKernelError as error:
            self._retry.update(file.path for file in files)
            self._retry.update(deletes)
            report.errors.append(str(error))
            return
        report.written += int(result.get("written", 0))
        report.deleted += int(result.get("deleted", 0))
        report.sent_bytes += sum(file.size for file in files)
        report.errors += list(result.get("errors", []))
        for file in files:
            self.synced[file.path] = (file.size, file.mtime_ns)
        for path in deletes:
            self.synced.pop(path, None)

    def _guard(self, deletes: list[str], report: SyncReport) -> list[str]:
        """Refuse a deletion of many files at once (a checkout, a mistaken rm -r); the VM keeps them."""
        too_many = len(deletes) > self.max_delete_count
        too_much = len(deletes) >= 10 and len(deletes) > self.max_delete_share * max(1, len(self.synced))
        if not deletes or not (too_many or too_much):
            return deletes
        report.refused_deletes = deletes
        for path in deletes:  # no longer ours to mirror: later passes leave them alone too
            self.synced.pop(path, None)
        log.warning("sync: refusing to delete %d files on the VM at once (limits: %d files, %d%% of the tree); "
                    "they stay there. Delete them on the VM if that was meant, or raise sync_max_delete_count",
                    len(deletes), self.max_delete_count, int(self.max_delete_share * 100))
        return []

    @staticmethod
    def _report(report: SyncReport) -> None:
        for error in report.errors:
            log.warning("sync: %s (retried with the next change)", error)


def _state_of(path: Path) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_size, info.st_mtime_ns) if stat.S_ISREG(info.st_mode) else None


def _safe(path: str) -> bool:
    """A relative path that stays inside the tree (the VM's listing is not trusted blindly)."""
    return bool(path) and not path.startswith("/") and ".." not in path.split("/")


def _beside(path: str) -> str:
    """Where the VM's copy of a conflicting file goes: 'results (from VM).csv' beside 'results.csv'."""
    stem, dot, suffix = path.rpartition(".")
    if not dot or "/" in suffix:
        return f"{path} (from VM)"
    return f"{stem} (from VM).{suffix}"


def _batches(files: Sequence[LocalFile]) -> Iterable[Sequence[LocalFile]]:
    """Consecutive runs of files of at most _BATCH_BYTES (a bigger file is a batch of its own)."""
    start, size = 0, 0
    for index, file in enumerate(files):
        if index > start and size + file.size > _BATCH_BYTES:
            yield files[start:index]
            start, size = index, 0
        size += file.size
    if start < len(files):
        yield files[start:]
