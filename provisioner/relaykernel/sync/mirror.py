"""A kernel's work-dir mirror: started with the kernel, watching while it runs, never able to kill it."""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path, PurePosixPath

from ..common.errors import RelayKernelError
from ..options import RelayOptions
from ..ssh.chain import SSHChain
from .engine import WorkdirSync
from .ignore import IgnoreRules
from .remote import RemoteTree

log = logging.getLogger(__name__)


class WorkdirMirror:
    """The local folder mirrored into the kernel's remote work dir; every failure is logged, none is raised."""

    def __init__(self, options: RelayOptions, chain: SSHChain, local_dir: Path) -> None:
        self.local_dir = local_dir
        self.remote = RemoteTree(chain, python_argv=options.python_argv(), root=options.remote_workdir,
                                 timeout_seconds=options.command_timeout_seconds)
        rules = IgnoreRules(local_dir, extra_patterns=options.sync_ignore,
                            max_file_size_bytes=int(options.sync_max_file_size_mb * 1e6))
        self.sync = WorkdirSync(local_dir, self.remote, rules, max_delete_count=options.sync_max_delete_count,
                                rescan_seconds=options.sync_rescan_seconds)
        self.max_files = options.sync_max_files
        self.output_dirs = list(options.sync_output_dirs)
        self.pull_seconds = options.sync_pull_seconds
        self._stopping = threading.Event()
        self._puller = threading.Thread(target=self._pull_loop, name="relaykernel-sync-pull", daemon=True)
        self.ready = False
        self._initial = threading.Thread(target=self._initial_sync, name="relaykernel-sync-initial", daemon=True)
        self._watching = False

    def start(self) -> WorkdirMirror:
        """Begin the initial sync in the background (it overlaps the kernel's own start)."""
        self._initial.start()
        return self

    def wait_and_watch(self, timeout_seconds: float) -> None:
        """Wait for the initial sync (so the first cell finds the files), then follow every change."""
        self._initial.join(timeout_seconds)
        if self._initial.is_alive():
            log.warning("sync: the initial sync of %s is still running after %g s; the kernel starts anyway",
                        self.local_dir, timeout_seconds)
        if self.ready:
            self.sync.watch()
            self._watching = True
            self._puller.start()

    def resume(self) -> None:
        """The link is back: retry what failed meanwhile (in the background)."""
        if self._watching:
            threading.Thread(target=self._rescan, name="relaykernel-sync-resume", daemon=True).start()

    def resolve(self, path: str) -> str | None:
        """The local file behind a path the kernel reported (relative to, or inside, its work dir)."""
        remote_root = self.remote.absolute_root
        candidate = PurePosixPath(path)
        if candidate.is_absolute():
            if remote_root is None or not candidate.is_relative_to(remote_root):
                return None
            candidate = candidate.relative_to(remote_root)
        if ".." in candidate.parts:
            return None
        local = self.local_dir / candidate
        return str(local) if local.exists() else None

    def stop(self) -> None:
        """Stop following changes, bring the outputs back one last time (before the kernel's files go)."""
        self._stopping.set()
        self.sync.stop()  # a long initial sync ends at its next batch boundary
        if self._initial.is_alive():
            self._initial.join(self.remote.timeout_seconds)
        if self._puller.is_alive():
            self._puller.join()
        if self.ready:
            self._pull()

    def _pull_loop(self) -> None:
        while not self._stopping.wait(self.pull_seconds):
            self._pull()

    def _pull(self) -> None:
        try:
            report = self.sync.pull(self.output_dirs)
        except (RelayKernelError, OSError) as error:
            log.warning("sync: bringing %s back failed: %s", ", ".join(self.output_dirs), error)
            return
        for problem in report.errors:
            log.warning("sync: %s", problem)

    def _initial_sync(self) -> None:
        try:
            if sum(1 for _ in itertools.islice(self.sync.rules.walk(), self.max_files + 1)) > self.max_files:
                log.warning("sync: %s holds more than %d files (sync_max_files): not syncing it; open the notebook "
                            "from its project folder, or set sync_local_dir", self.local_dir, self.max_files)
                return
            report = self.sync.initial()
        except (RelayKernelError, OSError) as error:
            log.warning("sync: the initial sync of %s failed: %s (the kernel runs without it)", self.local_dir, error)
            return
        for problem in report.errors:
            log.warning("sync: %s", problem)
        log.info("sync: %s -> %s: %d files, %.1f MB", self.local_dir, self.remote.root, report.written,
                 report.sent_bytes / 1e6)
        self.ready = True

    def _rescan(self) -> None:
        try:
            self.sync.rescan()
        except (RelayKernelError, OSError) as error:
            log.warning("sync: resuming after the link cut failed: %s (retried at the next change)", error)
