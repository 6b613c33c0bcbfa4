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
from .guard import guarded
from .ignore import IgnoreRules, LocalFile
from .plan import AheadHashes, batches, find_moves, plan_initial, source_for
from .remote import Batch, RemoteListing, RemoteTree
from .watcher import BatchWatcher

log = logging.getLogger(__name__)
Progress = Callable[[int, int, int], None]  # (files written, files to write, bytes sent)


@dataclass
class SyncReport:
    """What one pass did: files written, moved and deleted on the VM, bytes sent, and what it would not do."""

    written: int = 0
    moved: int = 0
    deleted: int = 0
    adopted: int = 0
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
        self.remote.source = remote.source or source_for(local_root)
        self.rules = rules
        self.max_delete_count = max_delete_count
        self.max_delete_share = max_delete_share
        self.rescan_seconds = rescan_seconds
        self.settle_seconds = settle_seconds
        self.synced: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) the VM has from us
        self.hashes: dict[str, str] = {}  # path -> sha256 of what the VM has from us
        self._retry: set[str] = set()
        self._conflicts: dict[str, tuple[int, int]] = {}  # path -> the VM's state already kept beside it
        self._lock = threading.Lock()
        self._watcher: BatchWatcher | None = None
        self._stopping = threading.Event()
        self._rescanner = threading.Thread(target=self._rescan_loop, name="relaykernel-sync-rescan", daemon=True)

    def initial(self, progress: Progress | None = None) -> SyncReport:
        """Send what differs (by content where size and mtime cannot be trusted); apply deletes made while away.

        Files that exist only on the VM are left alone (they may be output); a file this folder sent and then deleted
        here is deleted there, unless the VM changed it since: then it comes back beside its old name.
        """
        with self._lock:
            local = {file.path: file for file in self.rules.walk()}
            ahead = AheadHashes(self.local_root, sorted(local, key=lambda path: local[path].size))
            try:
                remote = self.remote.listing(sizes={path: file.size for path, file in local.items()})
                ahead.keep_only(set(remote.hashes))
                plan = plan_initial(self.local_root, local, remote, self._hashes_of(remote), ahead)
            finally:
                ahead.close()
            self.synced, self.hashes = plan.synced, plan.hashes
            self.synced.update((path, remote.files[path]) for path in plan.deletes)
            report = self._push(plan.send, plan.deletes, progress, defer_fresh=False, adopt=plan.adopt)
            if plan.conflicts:
                self._bring_back(plan.conflicts, remote.files, report)
            return report

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
            report = self._push(files, sorted(set(self.synced) - set(local)))
        if report.deferred and self._watcher is not None:
            self._watcher.requeue(set(report.deferred))  # still being written: looked at again once quiet
        return report

    def pull(self, output_dirs: Sequence[str]) -> SyncReport:
        """Bring files under output_dirs back from the VM; a file edited here since is kept, the VM's copy beside it."""
        prefixes = tuple(d.strip("/") + "/" for d in output_dirs if d.strip("/"))
        report = SyncReport()
        if not prefixes:
            return report
        with self._lock:
            remote = self.remote.listing(under=[prefix.rstrip("/") for prefix in prefixes]).files
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
            self._fetch(targets, remote, report)
        return report

    def _hashes_of(self, remote: RemoteListing) -> Callable[[list[str]], dict[str, str]]:
        """The VM's hashes of these paths: those that came with the listing, the rest asked for."""
        def lookup(paths: list[str]) -> dict[str, str]:
            missing = [path for path in paths if path not in remote.hashes]
            return {**remote.hashes, **self.remote.hashes(missing)}

        return lookup

    def _bring_back(self, paths: list[str], remote: dict[str, tuple[int, int]], report: SyncReport) -> None:
        self._fetch({path: _beside(path) for path in paths}, remote, report)
        report.conflicts += paths

    def _fetch(self, targets: dict[str, str], remote: dict[str, tuple[int, int]], report: SyncReport) -> None:
        if not targets:
            return
        try:
            fetched = self.remote.fetch(self.local_root, targets)
        except RelayKernelError as error:
            report.errors.append(str(error))
            return
        kept_beside = {path for path, target in targets.items() if target != path}
        for file in fetched:
            self.synced[file.path] = (file.size, file.mtime_ns)  # so the watcher does not send it back
        for path in kept_beside:
            self._conflicts[path] = remote[path]  # kept beside once; a later change on the VM comes again
            log.warning("sync: %s changed both here and on the VM; the VM's copy is %s", path, _beside(path))
        report.fetched += len(fetched)

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
        try:
            report = self.sync_paths(paths)
        except BaseException:
            self._retry.update(paths)  # an unexpected failure: these paths go with the next batch
            raise
        self._report(report)
        if report.deferred and self._watcher is not None:
            self._watcher.requeue(set(report.deferred))

    def _rescan_loop(self) -> None:
        while not self._stopping.wait(self.rescan_seconds):
            guarded("sync rescan", lambda: self._report(self.rescan()), self._stopping)

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

    def _push(self, files: Sequence[LocalFile], deletes: Sequence[str], progress: Progress | None = None, *,
              defer_fresh: bool = True, adopt: dict[str, tuple[int, str]] | None = None) -> SyncReport:
        report = SyncReport()
        deletes = self._guard(list(deletes), report)
        newest_settled = time.time_ns() - int(self.settle_seconds * 1e9) if defer_fresh else time.time_ns() * 2
        report.deferred = [file.path for file in files if file.mtime_ns > newest_settled]
        self._retry.update(report.deferred)
        files = [file for file in files if file.mtime_ns <= newest_settled]
        moves = find_moves(self.local_root, files, deletes, self.synced, self.hashes)
        moved_to, moved_from = {new for _, new in moves}, {old for old, _ in moves}
        files = [file for file in files if file.path not in moved_to]
        deletes = [path for path in deletes if path not in moved_from]
        parts = list(batches(files)) or ([[]] if deletes or moves or adopt else [])
        for index, part in enumerate(parts):
            if self._stopping.is_set():  # stop() during a long pass: end at a batch boundary
                break
            last = index == len(parts) - 1
            batch = Batch(part, deletes if last else (), moves if index == 0 else (),
                          (adopt or {}) if index == 0 else {})
            self._send(batch, report, len(files), progress)  # moves first, deletes last
        return report

    def _send(self, batch: Batch, report: SyncReport, total: int, progress: Progress | None) -> None:
        def sent(count: int) -> None:
            report.sent_bytes += count
            if progress:
                progress(report.written, total, report.sent_bytes)

        try:
            result = self.remote.apply(self.local_root, batch, sent)
        except RelayKernelError as error:
            self._retry.update(file.path for file in batch.files)
            self._retry.update([*batch.deletes, *(new for _, new in batch.moves), *(old for old, _ in batch.moves)])
            report.errors.append(str(error))
            return
        self._record(batch, result, report)
        if progress:
            progress(report.written, total, report.sent_bytes)
        missing = set(result.get("missing", []))
        if missing:  # a move whose source was gone on the VM: send the file itself
            again = [f for f in self.rules.walk() if f.path in missing]
            self._send(Batch(again), report, total, progress)

    def _record(self, batch: Batch, result: dict, report: SyncReport) -> None:
        report.written += int(result.get("written", 0))
        report.moved += int(result.get("moved", 0))
        report.deleted += int(result.get("deleted", 0))
        report.adopted += len(batch.adopt)
        report.errors += list(result.get("errors", []))
        hashes = result.get("hashes", {})
        for file in batch.files:
            self.synced[file.path] = (file.size, file.mtime_ns)
            if file.path in hashes:
                self.hashes[file.path] = hashes[file.path]
        missing = set(result.get("missing", []))
        for old, new in batch.moves:
            state, sha = self.synced.pop(old, None), self.hashes.pop(old, None)
            if new not in missing and state is not None and sha is not None:
                self.synced[new], self.hashes[new] = state, sha
        for path in batch.deletes:
            self.synced.pop(path, None)
            self.hashes.pop(path, None)

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
