"""One remote kernel reached through the relay: SSH chain, supervisor, resumable streams, link keeper, hooks.

Blocking throughout; the async fronts (the provisioner, ``relaykernel launch``) call it off their loop.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .common.errors import KERNEL, LinkDown, OperationTimeout, RelayKernelError
from .keeper import LinkKeeper
from .link import FINAL_EVENTS, StreamLink
from .options import RelayOptions
from .remote import Handshake, RemoteKernel, exit_status_of
from .ssh.chain import ChainPolicy, SSHChain
from .ssh.config import SSHConfigResolver
from .ssh.window import resize_receive_window

log = logging.getLogger(__name__)


def build_chain(options: RelayOptions) -> SSHChain:
    """Resolve every hop from the options and ssh config; nothing is connected yet."""
    resolver = SSHConfigResolver(options.ssh_config_file or None)
    hops = resolver.hops(options.require_host(), options.jump or None)
    policy = ChainPolicy(
        identity_file=options.identity_file or None,
        accept_unknown_host_keys=options.accept_unknown_host_keys,
        connect_timeout_seconds=options.connect_timeout_seconds,
        channel_timeout_seconds=options.command_timeout_seconds,
    )
    return SSHChain(hops, policy)


class KernelHooks(Protocol):
    """What rides along with a kernel (the work-dir sync): told when the link is up, back, and when all stops."""

    def link_up(self, chain: SSHChain) -> None: ...
    def link_back(self) -> None: ...
    def stopping(self) -> None: ...
    def resolve(self, path: str) -> str | None: ...


class RelayedKernel:
    """Start a kernel on the VM and make it look local: its five ports listen on 127.0.0.1 here."""

    def __init__(self, options: RelayOptions, *, kernel_id: str, sync_dir: Path | None = None,
                 kernel_arguments: Sequence[str] = (), hooks: Sequence[KernelHooks] = ()) -> None:
        self.options = options
        self.kernel_id = kernel_id
        self.sync_dir = sync_dir  # the local folder the kernel's VM work dir is derived from (options.kernel_workdir)
        self.kernel_arguments = list(kernel_arguments)
        self.hooks = list(hooks)
        self.chain: SSHChain | None = None
        self.remote: RemoteKernel | None = None
        self.link: StreamLink | None = None
        self.keeper: LinkKeeper | None = None
        self.final: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._hooked = False

    def listen(self, local_ports: Mapping[str, int]) -> dict[str, int]:
        """Bind the five local listeners before the kernel exists; connections wait for it."""
        if self.link is None:
            self.link = StreamLink(
                local_ports=local_ports, buffer_limit_bytes=int(self.options.stream_buffer_mb * 1e6),
                keepalive_seconds=self.options.liveness_interval_seconds,
                silence_seconds=self.options.link_timeout_seconds,
                on_down=self._link_down, on_final=self._on_final, resize_window=resize_receive_window,
            )
            self.link.start()
        return dict(self.link.local_ports)

    def start(self, *, key: bytes, signature_scheme: str, local_ports: Mapping[str, int]) -> dict[str, int]:
        """Launch the kernel with this HMAC key; return the local ports clients should use.

        Whatever step fails or is cancelled (``cancel``), everything this start made is closed again.
        """
        try:
            return self._start(key, signature_scheme, local_ports)
        except BaseException:
            self.close()
            raise

    def cancel(self) -> None:
        """Abandon a start in progress from another thread: its blocking step fails at once and it cleans up."""
        self._cancelled.set()
        chain = self.chain
        if chain is not None:
            chain.close()  # wakes whatever paramiko call the start is blocked in

    def _start(self, key: bytes, signature_scheme: str, local_ports: Mapping[str, int]) -> dict[str, int]:
        ports = self.listen(local_ports)
        self._step("connecting")
        if self.chain is None:
            self.chain = build_chain(self.options)
        self.chain.connect()
        self._step("launching the kernel")
        if not self._hooked:
            self._hooked = True
            for hook in self.hooks:
                hook.link_up(self.chain)  # the first sync overlaps the launch; the kernel never waits for it
        session = uuid.uuid4().hex
        mux = {"session": session, "buffer_limit_bytes": int(self.options.stream_buffer_mb * 1e6)}
        remote = RemoteKernel(self.chain, kernel_id=self.kernel_id, python_argv=self.options.python_argv(),
                              timeout_seconds=self.options.command_timeout_seconds)
        link = self.link
        assert link is not None
        try:
            handshake = remote.launch(self._launch_request(key, signature_scheme), mux,
                                      self.options.launch_timeout_seconds,
                                      on_sent=lambda channel: link.begin_session(channel, reading=False))
        except BaseException:
            link.end_session()
            raise
        self._begin(remote, handshake, mux)
        return ports

    def _begin(self, remote: RemoteKernel, handshake: Handshake, mux: dict[str, Any]) -> None:
        assert self.link is not None and self.chain is not None
        with self._lock:
            self.remote, self.final = remote, None
            self.link.start_reading(handshake.leftover)
            self.keeper = LinkKeeper(self.chain, remote, self.link, mux,
                                     max_backoff_seconds=self.options.reconnect_max_backoff_seconds,
                                     on_back=self._link_back, on_gone=self._gone)
            self.keeper.start()
        remote.prepare_next()  # the next start (a restart) finds its supervisor waiting
        self._step("started")

    def _step(self, what: str) -> None:
        if self._cancelled.is_set():
            raise OperationTimeout(f"starting the kernel was cancelled before {what}")
        log.debug("start of %s: %s", self.kernel_id[:8], what)

    def poll(self) -> int | None:
        """The kernel's exit status once it has ended on the VM; None while alive or while the link is down."""
        final = self.final
        return None if final is None else exit_status_of(final)

    def signal(self, signum: int) -> None:
        """Send a signal to the remote kernel (SIGINT interrupts it); returns once it is on its way.

        Nothing waits for the VM's confirmation (a round trip off every interrupt, restart and shutdown): the
        request rides the streams' channel ahead of any client byte sent after it, so the kernel gets the signal
        before the next request (a restart's shutdown_request). A missing or failed confirmation is logged.
        """
        link, remote, timeout = self.link, self.remote, self.options.command_timeout_seconds
        if link is None or remote is None or self.final is not None:
            return
        vm = remote.chain.vm_label

        def confirmed(event: dict[str, Any] | None) -> None:
            name = None if event is None else event.get("event")
            if name == "signalled" or name in FINAL_EVENTS:
                return  # delivered, or the kernel ended anyway
            why = f"no answer in {timeout:g} s" if event is None else event.get("message", name)
            log.warning("%s: signal %d to the kernel was not confirmed (%s); relaykernel reconnects by itself, "
                        "then interrupt again", vm, signum, why)

        if not link.post({"op": "signal", "signum": int(signum)}, {"signalled"}, timeout, confirmed):
            raise LinkDown(KERNEL, vm, f"signal {signum} could not be sent: the kernel's session is gone",
                           "start the kernel again")

    def stop_kernel(self) -> int | None:
        """Stop the remote kernel and its supervisor; keep the link and the listeners (for a restart).

        The shutdown request rides the streams' channel while the keeper still runs, so a link that is being
        rebuilt still carries it; only then does the keeper stop.
        """
        remote = self.remote
        status = self.poll()
        if remote is not None and status is None and self.link is not None:
            event = self.link.request({"op": "shutdown"}, {"exited"}, self.options.command_timeout_seconds)
            status = exit_status_of(event) if event is not None and event.get("event") == "exited" else None
            if status is None:
                log.warning("the kernel on %s did not confirm its shutdown; its lease (%g s) ends it",
                            remote.chain.vm_label, self.options.lease_seconds)
        with self._lock:
            keeper, self.keeper = self.keeper, None
            self.remote = None
        if keeper is not None:
            keeper.stop()
        if self.link is not None:
            self.link.end_session()
        return status

    def close(self) -> None:
        """Stop everything in reverse order of start; safe to call twice."""
        for hook in self.hooks if self._hooked else ():
            _quietly(hook.stopping, "stopping the work-dir sync")
        self._hooked = False
        self.stop_kernel()
        if self.link is not None:
            self.link.stop()
            self.link = None
        if self.chain is not None:
            self.chain.close()
            self.chain = None

    def resolve_path(self, path: str) -> str | None:
        """The local file for a path the kernel reported, when a hook (the sync) knows it."""
        for hook in self.hooks:
            found = hook.resolve(path)
            if found:
                return found
        return None

    def info(self) -> dict[str, Any]:
        """What a later process needs to find this kernel again (provisioner persistence)."""
        started = self.remote.started if self.remote else {}
        return {"kernel_id": self.kernel_id, "remote_pid": started.get("pid"), "run_dir": started.get("run_dir")}

    # ---- callbacks from the link and the keeper (their threads)

    def _link_down(self, why: str) -> None:
        keeper = self.keeper
        if keeper is not None and self.final is None:
            keeper.link_down(why)

    def _link_back(self) -> None:
        for hook in self.hooks:
            _quietly(hook.link_back, "resuming the work-dir sync")

    def _on_final(self, event: dict[str, Any]) -> None:
        if self.final is None:
            self.final = event
            why = event.get("why") or event.get("message", "")
            log.info("the kernel on the VM ended (status %s, %s)", event.get("status"), why)

    def _gone(self, event: dict[str, Any], outage_seconds: float) -> None:
        message = str(event.get("message", "it ended"))
        self._on_final({"event": "gone", "status": 1,
                        "message": f"the kernel ended while the link was down for {outage_seconds:.0f} s: {message}"})
        if self.link is not None:
            self.link.end_session()

    def _launch_request(self, key: bytes, signature_scheme: str) -> dict[str, Any]:
        return {
            "key": key.decode(),
            "signature_scheme": signature_scheme,
            "python_argv": self.options.python_argv(),
            "kernel_module": self.options.kernel_module,
            "kernel_arguments": self.kernel_arguments,
            "workdir": self.options.kernel_workdir(self.sync_dir),
            "lease_seconds": self.options.lease_seconds,
            "env": dict(self.options.remote_env),
            "ports_timeout_seconds": self.options.launch_timeout_seconds,
        }


def _quietly(func: Any, what: str) -> Any:
    try:
        return func()
    except (RelayKernelError, OSError) as error:
        log.warning("%s failed: %s", what, error)
        return None

