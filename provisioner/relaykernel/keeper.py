"""Bring the link to the VM back after a cut and resume the kernel's streams, without killing the kernel."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .common.errors import RelayKernelError
from .link import StreamLink
from .remote import RemoteKernel
from .ssh.chain import SSHChain

log = logging.getLogger(__name__)

_FIRST_RETRY_SECONDS = 0.2


class LinkKeeper:
    """A stoppable thread: when the link says it is down, reconnect with capped backoff and resume the streams."""

    def __init__(self, chain: SSHChain, remote: RemoteKernel, link: StreamLink, mux: dict[str, Any], *,
                 max_backoff_seconds: float, on_back: Callable[[], None] = lambda: None,
                 on_gone: Callable[[dict[str, Any], float], None] = lambda event, seconds: None) -> None:
        self.chain = chain
        self.remote = remote
        self.link = link
        self.mux = mux  # the session's "mux" request, sent again with every attach
        self.max_backoff_seconds = max_backoff_seconds
        self.on_back = on_back  # re-attached to the same, still running kernel
        self.on_gone = on_gone  # the kernel ended while the link was down (event, outage seconds)
        self._down = threading.Event()
        self._down_since: float | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relaykernel-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop reconnecting; safe to call twice and from any thread but the keeper's own."""
        self._stopping.set()
        self._down.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def link_down(self, why: str) -> None:
        """The link noticed a cut (any thread): log it once and reconnect."""
        if self._stopping.is_set() or self._down.is_set():
            return
        self._down_since = time.monotonic()
        log.warning("the link to %s is down (%s); reconnecting, the kernel keeps running", self.chain.vm_label, why)
        self._down.set()

    @property
    def is_down(self) -> bool:
        return self._down.is_set() and not self._stopping.is_set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._down.wait()
            if self._stopping.is_set():
                return
            self._reconnect()

    def _reconnect(self) -> None:
        delay, attempt = _FIRST_RETRY_SECONDS, 0
        while not self._stopping.is_set():
            attempt += 1
            try:
                # A cut VM leg leaves the relay's connection up: rebuild only the VM hop first; then everything.
                if self._try_reattach(keep_relays=attempt == 1 and self.chain.relays_active()):
                    return
            except Exception:  # the top-level guard: an unexpected error is logged, and the keeper goes on
                log.exception("reconnecting to %s failed unexpectedly; retrying", self.chain.vm_label)
            self._stopping.wait(delay)
            delay = min(delay * 2, self.max_backoff_seconds)

    def _try_reattach(self, *, keep_relays: bool) -> bool:
        try:
            self.chain.drop(keep_relays=keep_relays)
            self.chain.connect()
            handshake = self.remote.attach({**self.mux, "resume": True})
        except RelayKernelError as error:
            log.info("reconnect failed: %s", error)
            return False
        seconds = time.monotonic() - (self._down_since or time.monotonic())
        self._down.clear()  # before the link runs again: a cut from now on is a new outage
        if handshake.channel is None:
            log.warning("the kernel on %s ended while the link was down (%.1f s): %s", self.chain.vm_label, seconds,
                        handshake.event.get("message", handshake.event))
            self.on_gone(handshake.event, seconds)
            return True
        if handshake.resumed:
            held = self.link.resume(handshake.channel, handshake.leftover)
            log.warning("the link to %s is back after %.1f s; resuming %d bytes held for the VM", self.chain.vm_label,
                        seconds, held)
        else:
            log.warning("the link to %s is back after %.1f s, but the VM no longer had this session's streams: "
                        "clients reconnect", self.chain.vm_label, seconds)
            self.link.begin_session(handshake.channel, handshake.leftover)
        self.on_back()
        return True
