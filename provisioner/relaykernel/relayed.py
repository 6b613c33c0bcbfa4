"""One remote kernel reached through the relay: SSH chain, supervisor, five local forwards, link keeper.

Blocking throughout; the async fronts (the provisioner, ``relaykernel launch``) call it off their loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .common.errors import KERNEL, KernelNotRunning, RelayKernelError
from .forward import PortForwards
from .keeper import LinkKeeper
from .options import RelayOptions
from .remote import RemoteKernel
from .ssh.chain import ChainPolicy, SSHChain
from .ssh.config import SSHConfigResolver
from .sync.mirror import WorkdirMirror

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


class RelayedKernel:
    """Start a kernel on the VM and make it look local: its five ports listen on 127.0.0.1 here."""

    def __init__(self, options: RelayOptions, *, kernel_id: str, sync_dir: Path | None = None) -> None:
        self.options = options
        self.kernel_id = kernel_id
        self.sync_dir = sync_dir
        self.mirror: WorkdirMirror | None = None
        self.chain: SSHChain | None = None
        self.remote: RemoteKernel | None = None
        self.forwards: PortForwards | None = None
        self.keeper: LinkKeeper | None = None
        self._lock = threading.Lock()
        self._exit_expected = False

    def connect(self) -> None:
        """Connect the SSH chain (relay, then VM) if it is not up yet."""
        if self.chain is None:
            self.chain = build_chain(self.options)
        self.chain.connect()

    def listen(self, local_ports: Mapping[str, int]) -> dict[str, int]:
        """Bind the five local listeners before the kernel exists; they refuse connections until it is up."""
        if self.forwards is None:
            # Paused, with placeholder remote ports: connections wait for the kernel until start() retargets.
            self._forward_to(local_ports, local_ports, paused=True)
        assert self.forwards is not None
        return self.forwards.local_ports

    def start(self, *, key: bytes, signature_scheme: str, local_ports: Mapping[str, int]) -> dict[str, int]:
        """Launch the kernel with this HMAC key; return the local ports clients should use."""
        try:
            return self._start(key, signature_scheme, local_ports)
        except BaseException:
            self.close()
            raise

    def _start(self, key: bytes, signature_scheme: str, local_ports: Mapping[str, int]) -> dict[str, int]:
        self.connect()
        assert self.chain is not None
        first_start = self.mirror is None and self.sync_dir is not None
        if first_start:
            assert self.sync_dir is not None
            self.mirror = WorkdirMirror(self.options, self.chain, self.sync_dir).start()  # overlaps the launch
        remote = RemoteKernel(
            self.chain, kernel_id=self.kernel_id, python_argv=self.options.python_argv(),
            timeout_seconds=self.options.command_timeout_seconds,
        )
        remote.launch(self._launch_request(key, signature_scheme), self.options.launch_timeout_seconds)
        self.remote, self._exit_expected = remote, False
        if first_start and self.mirror is not None:
            self.mirror.wait_and_watch(self.options.launch_timeout_seconds)
        bound = self._forward_to(remote.ports, local_ports)
        # While the link is down, new connections wait for it instead of being refused (see PortForwards.pause).
        forwards = self.forwards
        assert forwards is not None
        self.keeper = LinkKeeper(self.chain, remote, self.options, on_down=forwards.pause,
                                 on_back=lambda: self._link_back(remote))
        self.keeper.start()
        return bound

    def poll(self) -> int | None:
        """The kernel's exit status once it has ended on the VM; None while alive or while the link is down."""
        return None if self.remote is None else self.remote.exit_status()

    def signal(self, signum: int) -> None:
        """Deliver a signal to the remote kernel (SIGINT interrupts it)."""
        if self.remote is not None and self.remote.exit_status() is None:
            self.remote.signal(signum)

    def expect_exit(self) -> None:
        """A shutdown was requested: new connections wait for the next kernel; closing ports are no outage."""
        self._exit_expected = True
        if self.forwards is not None:
            self.forwards.pause()

    def stop_kernel(self) -> int | None:
        """Stop the remote kernel and its supervisor; keep the link and the listeners (for a restart)."""
        self.expect_exit()
        with self._lock:
            if self.keeper is not None:
                self.keeper.stop()
                self.keeper = None
            remote, self.remote = self.remote, None
        if remote is None:
            return None
        status = remote.exit_status()
        if status is None:
            status = _quietly(remote.shutdown, "shutting the remote kernel down")
        remote.close()
        return status

    def close(self) -> None:
        """Stop everything in reverse order of start; safe to call twice."""
        if self.mirror is not None:
            self.mirror.stop()
            self.mirror = None
        self.stop_kernel()
        if self.forwards is not None:
            self.forwards.stop()
            self.forwards = None
        if self.chain is not None:
            self.chain.close()
            self.chain = None

    def resolve_path(self, path: str) -> str | None:
        """The local file for a path the kernel reported, when it is in the mirrored work dir."""
        return self.mirror.resolve(path) if self.mirror is not None else None

    def _link_back(self, remote: RemoteKernel) -> None:
        if self.forwards is not None:
            self.forwards.retarget(remote.ports)
        if self.mirror is not None:
            self.mirror.resume()

    def info(self) -> dict[str, Any]:
        """What a later process needs to find this kernel again (provisioner persistence)."""
        started = self.remote.started if self.remote else {}
        return {"kernel_id": self.kernel_id, "remote_pid": started.get("pid"), "run_dir": started.get("run_dir")}

    def _launch_request(self, key: bytes, signature_scheme: str) -> dict[str, Any]:
        return {
            "key": key.decode(),
            "signature_scheme": signature_scheme,
            "python_argv": self.options.python_argv(),
            "kernel_module": self.options.kernel_module,
            "workdir": self.options.kernel_workdir(self.sync_dir),
            "lease_seconds": self.options.lease_seconds,
            "env": dict(self.options.remote_env),
            "ports_timeout_seconds": self.options.launch_timeout_seconds,
        }

    def _forward_to(self, remote_ports: Mapping[str, int], local_ports: Mapping[str, int], *,
                    paused: bool = False) -> dict[str, int]:
        if self.forwards is not None:
            self.forwards.retarget(remote_ports)
            return self.forwards.local_ports
        forwards = PortForwards(local_ports=local_ports, remote_ports=remote_ports, open_channel=self._open_channel,
                                start_paused=paused, hold_seconds=self.options.launch_timeout_seconds)
        bound = forwards.start()
        self.forwards = forwards
        return bound

    def _open_channel(self, remote_port: int) -> Any:
        remote, chain = self.remote, self.chain
        if self._exit_expected or remote is None or chain is None or remote.exit_status() is not None:
            raise KernelNotRunning(KERNEL, self.kernel_id, "the kernel is not running", "restart the kernel")
        return chain.open_forward(remote_port)


def _quietly(func: Any, what: str) -> Any:
    try:
        return func()
    except RelayKernelError as error:
        log.warning("%s failed: %s", what, error)
        return None
