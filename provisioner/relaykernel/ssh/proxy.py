"""ProxyCommand run as OpenSSH runs it (by /bin/sh), outside our process tree and deaf to Ctrl-C.

Clients signal a kernel's whole process tree (VS Code sends SIGINT to interrupt and SIGTERM to dispose to every
descendant) and a terminal's Ctrl-C reaches its whole process group. A proxy we spawned as a plain child would die
of either, cutting the link the launcher needs to interrupt or shut down the remote kernel. So the proxy is started
in a session of its own by a shell that backgrounds it (which ignores SIGINT for it, and OpenSSH keeps an ignored
SIGINT ignored) and exits at once, leaving the proxy re-parented away from us. It still ends with us: its stdin is
our pipe, and EOF on it ends ``ssh -W`` and ``socat`` alike; close() also terminates it.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time

import paramiko

from ..common.errors import RELAY, ConnectError
from ..pids import pid_alive

_SHELL = "/bin/sh"
_PID_WAIT_SECONDS = 5.0
# The launcher shell gets the proxy's stdin on fd 0, its stdout on fd 1 and a pipe for the proxy's pid on fd 3;
# fd 4 carries stdin into the background job, whose stdin would otherwise be /dev/null.
_LAUNCHER = f'exec 4<&0; {_SHELL} -c "exec $1" <&4 4<&- 3>&- & echo $! >&3'


class DetachedProxyCommand(paramiko.ProxyCommand):
    """A socket-like pipe pair to a ProxyCommand that is not our descendant; drop-in for paramiko.ProxyCommand."""

    def __init__(self, command_line: str) -> None:  # deliberately not calling super(): it would spawn a child
        self.cmd = [_SHELL, "-c", command_line]
        self.timeout: float | None = None
        stdin_read, self._stdin = os.pipe()
        self._stdout, stdout_write = os.pipe()
        pid_read, pid_write = os.pipe()
        try:
            shell = os.posix_spawn(
                _SHELL, [_SHELL, "-c", _LAUNCHER, "relaykernel-proxy", command_line], os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, stdin_read, 0), (os.POSIX_SPAWN_DUP2, stdout_write, 1),
                              (os.POSIX_SPAWN_DUP2, pid_write, 3)],
                setsid=True, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # as subprocess restores them
            )
        finally:
            for fd in (stdin_read, stdout_write, pid_write):
                os.close(fd)
        self.pid = 0
        try:
            self.pid = _read_pid(pid_read, command_line)
        except BaseException:
            self.close()  # our pipe ends: a proxy that did start sees EOF and ends
            raise
        finally:
            os.close(pid_read)
            os.waitpid(shell, 0)

    def send(self, content: bytes) -> int:
        try:
            return os.write(self._stdin, content)
        except OSError as error:
            raise paramiko.ProxyCommandFailure(" ".join(self.cmd), error.strerror) from None

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes; b"" once the proxy has closed its output (paramiko's own spins there)."""
        ready, _, _ = select.select([self._stdout], [], [], self.timeout)
        if not ready:
            raise socket.timeout()
        try:
            return os.read(self._stdout, size)
        except OSError as error:
            raise paramiko.ProxyCommandFailure(" ".join(self.cmd), error.strerror) from None

    def close(self) -> None:
        """Close our ends (EOF ends the proxy) and terminate it; safe to call twice."""
        fds, self._stdin, self._stdout = (self._stdin, self._stdout), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        if self.pid and pid_alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)

    @property
    def closed(self) -> bool:
        return not self.pid or not pid_alive(self.pid)

    @property
    def _closed(self) -> bool:
        return self.closed

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout


def _read_pid(fd: int, command_line: str) -> int:
    deadline = time.monotonic() + _PID_WAIT_SECONDS
    data = b""
    while not data.endswith(b"\n") and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        chunk = os.read(fd, 32) if ready else b""
        if ready and not chunk:
            break
        data += chunk
    try:
        return int(data)
    except ValueError:
        raise ConnectError(RELAY, command_line, "the ProxyCommand could not be started",
                           f"check that {_SHELL} exists and that the command runs from a terminal") from None
