"""A kernel's work-dir mirror: a first sync in the background, then live sync however late, never able to kill it."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path, PurePosixPath

from ..common.errors import RelayKernelError
from ..options import RelayOptions
from ..ssh.chain import SSHChain
from .budget import local_sizes, over_budget, too_many_files
from .engine import Progress, WorkdirSync
from .guard import guarded
from .ignore import IgnoreRules
from .remote import RemoteTree

log = logging.getLogger(__name__)
PROGRESS_EVERY_SECONDS = 3.0
_RETRY_MAX_SECONDS = 30.0


class WorkdirMirror:
    """The local folder mirrored into the kernel's remote work dir; every failure is logged, none is raised.

    ``start()`` returns at once: the first sync runs in the background (the kernel never waits for it) and, when it
    ends, however late, the watcher, the rescanner and the output puller start. A first sync cut by the link is
    retried, at once when ``resume()`` says the link is back.
    """

    def __init__(self, options: RelayOptions, chain: SSHChain, local_dir: Path) -> None:
        self.local_dir = local_dir
        self.remote = RemoteTree(chain, python_argv=options.python_argv(), root=options.kernel_workdir(local_dir),
                                 timeout_seconds=options.command_timeout_seconds)
        rules = IgnoreRules(local_dir, extra_patterns=options.sync_ignore,
                            max_file_size_bytes=int(options.sync_max_file_size_mb * 1e6))
        self.sync = WorkdirSync(local_dir, self.remote, rules, max_delete_count=options.sync_max_delete_count,
                                rescan_seconds=options.sync_rescan_seconds)
        self.max_files = options.sync_max_files
        self.budget_bytes = int(options.sync_initial_budget_mb * 1e6)
        self.output_dirs = list(options.sync_output_dirs)
        self.pull_seconds = options.sync_pull_seconds
        self._stopping = threading.Event()
        self._link_back = threading.Event()
        self._puller = threading.Thread(target=self._pull_loop, name="relaykernel-sync-pull", daemon=True)
        self._initial = threading.Thread(target=self._first_sync, name="relaykernel-sync-initial", daemon=True)
        self.ready = threading.Event()  # set when the first sync is done and live sync runs

    def start(self) -> WorkdirMirror:
        """Begin the first sync in the background; live sync follows on its own when it ends."""
        self._initial.start()
        return self

    def resume(self) -> None:
        """The link is back: retry what failed meanwhile (in the background)."""
        self._link_back.set()
        if self.ready.is_set():
            def rescan() -> None:
                guarded("sync after the link came back", self.sync.rescan, self._stopping)

            threading.Thread(target=rescan, name="relaykernel-sync-resume", daemon=True).start()

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
        self.sync.stop()  # a long first sync ends at its next batch boundary
        if self._initial.is_alive():
            self._initial.join(self.remote.timeout_seconds)
        if self._puller.is_alive():
            self._puller.join()
        if self.ready.is_set():
            self._pull()
        self.remote.close()

    def _first_sync(self) -> None:
        """Sync the folder (retrying while the link is away, refusing one over budget), then start live sync."""
        wait, outcome = 1.0, [None]  # type: tuple[float, list[bool | None]]

        def attempt() -> None:
            outcome[0] = self._initial_pass()

        while not self._stopping.is_set():
            guarded("the first sync", attempt, self._stopping, backoff_seconds=0.0)
            if outcome[0] is not None:
                break
            self._link_back.clear()
            self._link_back.wait(wait)  # or at once when the link is back
            wait = min(wait * 2, _RETRY_MAX_SECONDS)
        if self._stopping.is_set() or not outcome[0]:
            return
        self.sync.watch()
        guarded("the pass after the first sync", self.sync.rescan, self._stopping)  # what changed meanwhile
        self.ready.set()
        self._puller.start()

    def _initial_pass(self) -> bool | None:
        """True: synced; False: refused (said why); None: cut by the link, to be retried."""
        sizes = local_sizes(self.sync.rules, self.max_files)
        if sizes is None:
            log.warning("sync: %s", too_many_files(self.local_dir, self.max_files))
            return False
        try:
            if sum(sizes.values()) > self.budget_bytes:
                there = self.remote.listing().files
                pending = {path: size for path, size in sizes.items() if there.get(path, (-1, 0))[0] != size}
                refusal = over_budget(self.local_dir, pending, self.budget_bytes)
                if refusal:
                    log.warning("sync: %s", refusal)
                    return False
            report = self.sync.initial(self._progress_logger())
        except RelayKernelError as error:
            log.warning("sync: the first sync of %s was cut: %s; it starts again once the link is back",
                        self.local_dir, error)
            return None
        for problem in report.errors:
            log.warning("sync: %s", problem)
        log.info("sync: %s -> %s: %d files, %.1f MB; live sync on", self.local_dir, self.remote.absolute_root,
                 report.written, report.sent_bytes / 1e6)
        return True

    def _progress_logger(self) -> Progress:
        started = last = time.monotonic()

        def progress(done: int, total: int, sent_bytes: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_SECONDS:
                last = now
                log.info("sync: first sync of %s: %d/%d files, %.1f MB, %.2f MB/s", self.local_dir, done, total,
                         sent_bytes / 1e6, sent_bytes / 1e6 / max(now - started, 1e-3))

        return progress

    def _pull_loop(self) -> None:
        while not self._stopping.wait(self.pull_seconds):
            guarded("bringing outputs back", self._pull, self._stopping)

    def _pull(self) -> None:
        try:
            report = self.sync.pull(self.output_dirs)
        except (RelayKernelError, OSError) as error:
            log.warning("sync: bringing %s back failed: %s", ", ".join(self.output_dirs), error)
            return
        for problem in report.errors:
            log.warning("sync: %s", problem)
