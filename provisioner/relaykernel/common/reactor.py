"""A selectors loop whose handlers can be changed at any time: read and write callbacks per file descriptor."""

from __future__ import annotations

import selectors
from typing import Callable, Optional

Handler = Optional[Callable[[], None]]


class Reactor:
    """Who to call when a descriptor is readable or writable; ``set`` with neither forgets it."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._handlers: dict[int, tuple[Handler, Handler]] = {}

    def set(self, fd: int, on_read: Handler = None, on_write: Handler = None) -> None:
        events = (selectors.EVENT_READ if on_read else 0) | (selectors.EVENT_WRITE if on_write else 0)
        known = fd in self._handlers
        if not events:
            if known:
                self.selector.unregister(fd)
                del self._handlers[fd]
            return
        if not known:
            self.selector.register(fd, events)
        elif self.selector.get_key(fd).events != events:
            self.selector.modify(fd, events)
        self._handlers[fd] = (on_read, on_write)

    def forget(self, fd: int) -> None:
        self.set(fd)

    def run_once(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            if mask & selectors.EVENT_READ:
                self._call(key.fd, 0)
            if mask & selectors.EVENT_WRITE:
                self._call(key.fd, 1)

    def _call(self, fd: int, which: int) -> None:
        handlers = self._handlers.get(fd)  # an earlier handler of this round may have dropped it
        handler = handlers[which] if handlers else None
        if handler is not None:
            handler()

    def close(self) -> None:
        self.selector.close()
        self._handlers.clear()
