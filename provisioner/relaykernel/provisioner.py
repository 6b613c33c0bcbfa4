"""RelayProvisioner: jupyter_client's kernel provisioner for a kernel on a relayed VM (async front)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase

from .common.errors import ConfigError, OperationTimeout, RelayKernelError
from .common.protocol import PORT_NAMES
from .offload import run_blocking
from .options import RelayOptions
from .relayed import RelayedKernel
from .sync.attach import sync_hooks

_POLL_INTERVAL_SECONDS = 0.1
_VM_SIGTERM, _VM_SIGKILL = 15, 9  # Linux's numbers: the signal goes to the VM (this laptop may have no SIGKILL)


class RelayProvisioner(KernelProvisionerBase, RelayOptions):  # type: ignore[misc,metaclass]
    """Launch the kernel on the VM over SSH and hand the KernelManager local forwarded ports."""

    relayed: RelayedKernel | None = None
    restored: dict[str, Any] | None = None  # the remote kernel's identity, from load_provisioner_info

    @property
    def has_process(self) -> bool:
        """True while a remote kernel is running (``KernelManager.has_kernel``)."""
        return self.relayed is not None and self.relayed.remote is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Check the configuration and build the command (``KernelManager.pre_start_kernel``)."""
        self.require_host()
        extra_arguments = kwargs.pop("extra_arguments", [])
        km = self.parent
        cmd = km.format_kernel_cmd(extra_arguments=extra_arguments) if km else self.kernel_spec.argv
        return await super().pre_launch(cmd=cmd, **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the kernel on the VM and its local forwards (``KernelManager._launch_kernel``)."""
        km = self.parent
        if km is None:
            raise ConfigError("RelayProvisioner needs its KernelManager as parent (jupyter_client sets it)")
        if self.relayed is None:
            sync_dir = self.sync_dir(kwargs.get("cwd"))
            self.relayed = RelayedKernel(self, kernel_id=self.kernel_id, sync_dir=sync_dir,
                                         kernel_arguments=cmd[len(self.kernel_spec.argv):],  # the client's extras
                                         hooks=sync_hooks(self, sync_dir))
        relayed = self.relayed
        try:
            ports = await run_blocking(
                relayed.start,
                key=km.session.key,
                signature_scheme=km.session.signature_scheme,
                local_ports={name: getattr(km, name) for name in PORT_NAMES},
                timeout_seconds=self._start_timeout_seconds(),
                what=f"starting the kernel on {self.host}",
            )
        except OperationTimeout:
            relayed.cancel()  # the start still running in its thread fails at once and closes all it made
            self.relayed = None
            raise
        except BaseException:
            self.relayed = None  # start() has already closed whatever it opened
            raise
        info = {
            "ip": "127.0.0.1",
            "transport": "tcp",
            "key": km.session.key,
            "signature_scheme": km.session.signature_scheme,
            "kernel_name": km.kernel_name,
            **ports,
        }
        self.connection_info = cast(KernelConnectionInfo, info)
        return self.connection_info

    async def poll(self) -> int | None:
        """None while the remote kernel runs or the link is down; its exit status once it ended."""
        if self.relayed is None:
            return 0
        return self.relayed.poll()

    async def wait(self) -> int | None:
        """Wait until the remote kernel has ended; its exit status."""
        while (status := await self.poll()) is None:
            await asyncio.sleep(_POLL_INTERVAL_SECONDS)
        return status

    async def send_signal(self, signum: int) -> None:
        """Deliver a signal to the kernel on the VM (``KernelManager.signal_kernel``, interrupts)."""
        if self.relayed is None:
            return
        try:
            await run_blocking(
                self.relayed.signal, signum, timeout_seconds=self.command_timeout_seconds * 2,
                what=f"sending signal {signum} to the kernel on {self.host}",
            )
        except RelayKernelError as error:
            self.log.warning("could not deliver signal %s: %s", signum, error)

    async def shutdown_requested(self, restart: bool = False) -> None:
        """The client sent shutdown_request (``KernelManager._async_shutdown_kernel``): nothing to do here.

        The request travels on the kernel's own (resumable) control stream; the kernel's end closes its streams.
        """

    async def kill(self, restart: bool = False) -> None:
        """Kill the remote kernel (``KernelManager._kill_kernel``)."""
        await self.send_signal(_VM_SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        """Ask the remote kernel to terminate (``KernelManager.finish_shutdown``)."""
        await self.send_signal(_VM_SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        """Stop the remote kernel; on restart keep the SSH link and the local listeners, else close all."""
        relayed = self.relayed
        if relayed is None:
            return
        step = relayed.stop_kernel if restart else relayed.close
        try:
            await run_blocking(
                step, timeout_seconds=self.command_timeout_seconds * 2,
                what=f"cleaning up the kernel on {self.host}",
            )
        finally:
            if not restart:
                self.relayed = None

    async def get_provisioner_info(self) -> dict[str, Any]:
        """What is needed to find this kernel again: the base info plus the remote kernel's identity."""
        info = await super().get_provisioner_info()
        remote = self.relayed.info() if self.relayed else (self.restored or {})
        info["relay"] = {"host": self.host, "jump": self.jump, **remote}
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """The inverse of get_provisioner_info."""
        await super().load_provisioner_info(provisioner_info)
        relay = dict(provisioner_info.get("relay", {}))
        self.host = relay.pop("host", self.host)
        self.jump = relay.pop("jump", self.jump)
        self.restored = relay

    def resolve_path(self, path: str) -> str | None:
        """A path the kernel reported, as the local file in the mirrored work dir (``KernelManager.resolve_path``)."""
        return self.relayed.resolve_path(path) if self.relayed is not None else None

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        """A graceful shutdown crosses two SSH hops: allow at least shutdown_wait_seconds."""
        return max(recommended, self.shutdown_wait_seconds)

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        """A (re)start over a slow link can take longer than a local one."""
        return max(recommended, self.stable_start_seconds)

    def _start_timeout_seconds(self) -> float:
        return self.connect_timeout_seconds * 3 + self.launch_timeout_seconds + self.command_timeout_seconds
