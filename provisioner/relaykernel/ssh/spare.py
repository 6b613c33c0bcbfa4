"""One program started on the VM ahead of need (the next restart's supervisor), waiting there for its first lines."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable

import paramiko

from ..common.errors import HopError

log = logging.getLogger(__name__)


class SpareProgram:
    """At most one pre-started program: ``prepare`` starts it in the background, ``take`` hands it over once.

    Starting a program costs the session open, a round trip for sshd to open the session's window after the exec,
    and the program's upload: a restart that finds its supervisor already waiting pays none of them. The spare
    starts ``delay_seconds`` after it is asked for, so its upload never competes with the clients' first messages
    to a kernel that just started (on a 1 Mbit/s uplink 22 KB are a fifth of a second). A spare that is never taken
    ends with its channel (the program reads end-of-input and exits without doing anything).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channel: paramiko.Channel | None = None
        self._key: Hashable = None
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()

    def prepare(self, key: Hashable, start: Callable[[], paramiko.Channel], delay_seconds: float = 0.0) -> None:
        """Run ``start`` in the background after ``delay_seconds``, unless a spare for ``key`` is there or on its
        way."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            if self._channel is not None and self._key == key:
                return
            self._cancel = threading.Event()
            self._thread = threading.Thread(target=self._start, args=(key, start, delay_seconds, self._cancel),
                                            name="relaykernel-spare", daemon=True)
            self._thread.start()

    def take(self, key: Hashable, transport: paramiko.Transport | None) -> paramiko.Channel | None:
        """The spare for ``key`` if it is still running on ``transport``; None otherwise (and any other is closed)."""
        with self._lock:
            channel, self._channel = self._channel, None
            matches = self._key == key
        if channel is None:
            return None
        alive = transport is not None and transport.is_active() and channel.get_transport() is transport and \
            channel.active and not channel.closed and not channel.exit_status_ready()
        if matches and alive:
            return channel
        channel.close()
        return None

    def discard(self) -> None:
        """Close the spare, if any, and give up one still waiting to start (a cut, or the end)."""
        with self._lock:
            self._cancel.set()
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def join(self, timeout_seconds: float) -> None:
        """Wait for a start in progress to end (after the transport closed, it ends at once) and close its spare."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout_seconds)
        self.discard()

    def _start(self, key: Hashable, start: Callable[[], paramiko.Channel], delay_seconds: float,
               cancel: threading.Event) -> None:
        if cancel.wait(delay_seconds):
            return
        try:
            channel = start()
        except HopError as error:
            log.debug("no spare program (%s): the next start starts its own", error)
            return
        except Exception:  # noqa: BLE001 - the thread's one guard: a spare is only ever a saving
            log.exception("starting a spare program failed; the next start starts its own")
            return
        with self._lock:
            if cancel.is_set():  # discarded while it started
                old, self._channel = channel, self._channel
            else:
                old, self._channel, self._key = self._channel, channel, key
        if old is not None:
            old.close()
