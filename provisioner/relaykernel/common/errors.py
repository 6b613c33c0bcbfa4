"""The one exception tree: every failure names its hop, says why, and says what to do."""

from __future__ import annotations

RELAY = "relay"
VM = "VM"
KERNEL = "kernel"
LOCAL = "local"


class RelayKernelError(Exception):
    """Root of every error relaykernel raises on purpose."""


class ConfigError(RelayKernelError, ValueError):
    """An option or a kernelspec is wrong; the message says which and how to fix it."""


class HopError(RelayKernelError):
    """A failure on one hop of the path: the relay, the VM, the kernel, or the local side."""

    def __init__(self, hop: str, where: str, problem: str, fix: str = "") -> None:
        self.hop = hop
        self.where = where
        self.problem = problem
        self.fix = fix
        message = f"{hop} {where}: {problem}"
        if fix:
            message += f"\n  fix: {fix}"
        super().__init__(message)


class ConnectError(HopError):
    """The hop could not be reached (refused, no route, timed out)."""


class AuthError(HopError):
    """The hop refused every credential we offered."""


class HostKeyError(HopError):
    """The hop's host key could not be verified."""

    def __init__(self, hop: str, where: str, problem: str, fix: str, *, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        super().__init__(hop, where, problem, fix)


class UnknownHostKey(HostKeyError):
    """No known_hosts file lists a key for this host."""


class ChangedHostKey(HostKeyError):
    """known_hosts lists a different key for this host: possibly a new VM, possibly an attack."""


class RevokedHostKey(HostKeyError):
    """The host presented a key marked @revoked."""


class ForwardRefused(HopError):
    """A hop refused to open a channel to the next one (not forwarded, or not permitted)."""


class KernelNotRunning(ForwardRefused):
    """No kernel is there to connect to: it is restarting, shutting down or has ended (an expected outage)."""


class RemoteLaunchError(HopError):
    """The VM could not start the kernel (python, ipykernel, work dir, ports)."""


class VMSetupError(HopError):
    """A step of the bootstrap cell on the VM failed (sshd, keys, storage, tunnel)."""


class CheckpointError(HopError):
    """A checkpoint could not be written to (or restored from) persistent storage; the kernel is unaffected."""


class LinkDown(HopError):
    """The SSH link is down right now; callers may retry after it is rebuilt."""


class ForwardBindError(HopError):
    """A local listener could not bind its address."""


class OperationTimeout(RelayKernelError, TimeoutError):
    """A blocking step did not finish within its timeout."""
