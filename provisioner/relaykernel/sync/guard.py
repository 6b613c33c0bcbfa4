"""The top-level guard of the sync's threads: an unexpected error is logged once, with its traceback, then retried."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)
_SEEN_LIMIT = 100
_seen: set[tuple[str, str, str]] = set()
_seen_lock = threading.Lock()


def guarded(what: str, body: Callable[[], object], stopping: threading.Event, backoff_seconds: float = 1.0) -> bool:
    """Run ``body``; on an unexpected exception log it (its first time only) and wait ``backoff_seconds``.

    True when ``body`` returned. A thread that loops over this never dies of a bug or a library's surprise (a
    malformed .gitignore line, a paramiko error that escaped): it reports it and keeps working.
    """
    try:
        body()
        return True
    except Exception as error:  # the thread's top-level guard: whatever it was, the loop goes on
        key = (what, type(error).__name__, str(error)[:200])
        with _seen_lock:
            first = key not in _seen
            if first and len(_seen) < _SEEN_LIMIT:
                _seen.add(key)
        if first:
            log.error("sync: %s failed unexpectedly (%s: %s); it goes on after %g s", what, type(error).__name__,
                      error, backoff_seconds, exc_info=True)
        else:
            log.debug("sync: %s failed again: %s", what, error)
        stopping.wait(backoff_seconds)
        return False
