"""Keep a remote kernel's lease renewed and rebuild the SSH link after a cut, without killing the kernel."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .common.errors import RelayKernelError
from .options import RelayOptions
from .remote import RemoteKernel
from .ssh.chain import SSHChain

log = logging.getLogger(__name__)

_FIRST_RETRY_SECONDS = 0.2
_INNER_ATTEMPTS_BEFORE_FULL_RECONNECT = 3


class LinkKeeper:
    """A stoppable thread: renew the lease every interval; on silence, reconnect with capped backoff."""

    def __init__(self, chain: SSHChain, remote: RemoteKernel, options: RelayOptions, *,
                 on_down: Callable[[], None] = lambda: None, on_back: Callable[[], None] = lambda: None) -> None:
        self.chain = chain
        self.remote = remote
        self.on_down = on_down  # the link went silent (called before reconnecting)
        self.on_back = on_back  # re-attached to the same, still running kernel
        self.interval_seconds = options.liveness_interval_seconds
        self.max_backoff_seconds = options.reconnect_max_backoff_seconds
        self.link_up = threading.Event()
        self.link_up.set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relaykernel-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing; safe to call twice and from any thread but the keeper's own."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> LinkKeeper:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_seconds):
            if self.remote.exit_status() is not None:
                return
            if self._link_answers():
                continue
            self.link_up.clear()
            self.on_down()
            self._reconnect()

    def _link_answers(self) -> bool:
        return self.chain.is_active() and not self.remote.link_lost() and self.remote.renew()

    def _reconnect(self) -> None:
        log.warning("the link to %s is down; reconnecting (the kernel keeps running)", self.chain.vm_label)
        delay, attempts = _FIRST_RETRY_SECONDS, 0
        while not self._stopping.is_set():
            attempts += 1
            if self._try_reattach(keep_relays=attempts <= _INNER_ATTEMPTS_BEFORE_FULL_RECONNECT):
                self.link_up.set()
                return
            self._stopping.wait(delay)
            delay = min(delay * 2, self.max_backoff_seconds)

    def _try_reattach(self, *, keep_relays: bool) -> bool:
        try:
            self.chain.drop(keep_relays=keep_relays)
            self.chain.connect()
            event = self.remote.attach()
        except RelayKernelError as error:
            log.info("reconnect failed: %s", error)
            return False
        if event.get("event") == "status":
            log.warning("the link to %s is back", self.chain.vm_label)
            self.on_back()
        else:
            log.warning("the kernel on %s is gone: %s", self.chain.vm_label, event.get("message", event))
        return True
