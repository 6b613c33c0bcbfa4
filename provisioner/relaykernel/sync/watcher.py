"""Filesystem events (watchdog) collected into debounced batches of paths, handed over outside the lock."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .guard import guarded

QUIET_SECONDS = 0.07  # an editor's save is done by then; above the engine's settle time (50 ms), so it goes now


class _Collector(FileSystemEventHandler):
    def __init__(self, root: Path, add: Callable[[str], None]) -> None:
        self._root = str(root)
        self._add = add

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("opened", "closed_no_write"):
            guarded("collecting file events", lambda: self._collect(event), threading.Event(), 0.0)

    def _collect(self, event: FileSystemEvent) -> None:
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                relative = os.path.relpath(os.fsdecode(path), self._root)
                if not relative.startswith(".."):
                    self._add(relative.replace(os.sep, "/"))


class BatchWatcher:
    """Watch ``root`` recursively; call ``on_batch(paths)`` once events pause for ``quiet_seconds``.

    A steady stream of events is still flushed every ``max_delay_seconds``. Each path appears once per batch, and
    the callback runs on the watcher's own thread with no lock held, so it may take its time.
    """

    def __init__(self, root: Path, on_batch: Callable[[set[str]], None], *, quiet_seconds: float = QUIET_SECONDS,
                 max_delay_seconds: float = 1.0) -> None:
        self.root = root
        self.on_batch = on_batch
        self.quiet_seconds = quiet_seconds
        self.max_delay_seconds = max_delay_seconds
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._first_at = 0.0
        self._last_at = 0.0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._observer = Observer()
        self._observer.schedule(_Collector(root, self._add), str(root), recursive=True)
        self._thread = threading.Thread(target=self._run, name="relaykernel-sync-batches", daemon=True)

    def start(self) -> BatchWatcher:
        self._observer.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching, flush nothing more, join both threads; safe to call twice."""
        self._stopping.set()
        self._wake.set()
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def requeue(self, paths: set[str]) -> None:
        """Look at these paths again after the next quiet spell (files still being written)."""
        for path in paths:
            self._add(path)

    def _add(self, path: str) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._pending:
                self._first_at = now
            self._pending.add(path)
            self._last_at = now
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait()
            self._wake.clear()
            while not self._stopping.is_set():
                with self._lock:
                    if not self._pending:
                        break
                    now = time.monotonic()
                    due = min(self._last_at + self.quiet_seconds, self._first_at + self.max_delay_seconds)
                    if now >= due:
                        batch, self._pending = self._pending, set()
                    else:
                        batch = set()
                if batch:
                    guarded("syncing saved files", functools.partial(self.on_batch, batch), self._stopping)
                else:
                    self._stopping.wait(max(0.01, due - now))
