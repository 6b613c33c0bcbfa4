"""ProxyCommand run as OpenSSH runs it (by /bin/sh), in a process group of its own that close() stops whole.

Clients signal a kernel's whole process tree (VS Code sends SIGINT to interrupt and SIGTERM to dispose to every
descendant) and a terminal's Ctrl-C reaches its whole process group. A proxy we spawned as a plain child would die
of either, cutting the link the launcher needs to interrupt or shut down the remote kernel. So a launcher shell
starts a session (its pid is the group's id), backgrounds the command (which ignores SIGINT for it, and OpenSSH
keeps an ignored SIGINT ignored) and exits at once, leaving the proxy re-parented away from us. Everything the
command starts stays in that group: close() sends the group SIGTERM, then SIGKILL after a grace, so nothing it
spawned outlives the attempt. Its stderr goes to a private file (not ours, which a leftover would hold open) and
its exit status to a pipe, so a proxy that fails is reported as "ProxyCommand `…` exited N: <its last lines>".
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import tempfile
import time

import paramiko

from ..common.errors import RELAY, ConnectError
from ..pids import pid_alive

_SHELL = "/bin/sh"
_GRACE_SECONDS = 2.0
_EXIT_WAIT_SECONDS = 2.0
_POLL_SECONDS = 0.02
_STDERR_CAP_BYTES = 256 * 1024  # trimmed to its tail beyond this: a chatty proxy cannot fill the disk
_STDERR_TAIL_BYTES = 4096
_STDERR_TAIL_LINES = 5
# fd 0 is the proxy's stdin, fd 1 its stdout, fd 2 the stderr file, fd 3 the exit-status pipe. The background job
# is a subshell that runs the command and writes its status; fd 4 carries stdin into it (a background job's stdin
# would otherwise be /dev/null).
_LAUNCHER = f'exec 4<&0; {{ {_SHELL} -c "$1" <&4 4<&- 3>&-; echo $? >&3; }} & exit 0'


class ProxyCommandExited(paramiko.ProxyCommandFailure):
    """The ProxyCommand ended (or closed its output) before or during the SSH session; says how, with its stderr."""

    def __init__(self, command: str, outcome: str) -> None:
        super().__init__(command, outcome)
        self.outcome = outcome

    def __str__(self) -> str:
        return self.outcome


class DetachedProxyCommand(paramiko.ProxyCommand):
    """A socket-like pipe pair to a ProxyCommand in its own process group; drop-in for paramiko.ProxyCommand."""

    def __init__(self, command_line: str) -> None:  # deliberately not calling super(): it would spawn a child
        self.cmd = [_SHELL, "-c", command_line]
        self.command_line = command_line
        self.timeout: float | None = None
        self._exit_status: int | None = None
        self._stopped = False
        self._reads = 0
        self._stderr = _private_file()
        stdin_read, self._stdin = os.pipe()
        self._stdout, stdout_write = os.pipe()
        self._status, status_write = os.pipe()
        try:
            self.pgid = os.posix_spawn(
                _SHELL, [_SHELL, "-c", _LAUNCHER, "relaykernel-proxy", command_line], os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, stdin_read, 0), (os.POSIX_SPAWN_DUP2, stdout_write, 1),
                              (os.POSIX_SPAWN_DUP2, self._stderr, 2), (os.POSIX_SPAWN_DUP2, status_write, 3)],
                setsid=True, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # as subprocess restores them
            )
        except OSError as error:
            for fd in (self._stdin, self._stdout, self._status, self._stderr):
                os.close(fd)
            self._stdin = self._stdout = self._status = self._stderr = -1
            raise ConnectError(RELAY, command_line, f"the ProxyCommand could not be started ({error.strerror})",
                               f"check that {_SHELL} exists and that the command runs from a terminal") from None
        finally:
            for fd in (stdin_read, stdout_write, status_write):
                os.close(fd)
        os.waitpid(self.pgid, 0)  # the launcher exits at once; its group lives on with the command in it

    def send(self, content: bytes) -> int:
        try:
            return os.write(self._stdin, content)
        except OSError as error:
            raise ProxyCommandExited(self.command_line, self._ended(f"stopped reading ({error.strerror})")) from None

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes; ProxyCommandExited once the proxy has closed its output."""
        try:
            ready, _, _ = select.select([self._stdout], [], [], self.timeout)
            data = os.read(self._stdout, size) if ready else None
        except (OSError, ValueError) as error:
            if self._stdout < 0:
                raise EOFError("closed") from None  # close() ran meanwhile: paramiko ends quietly on EOFError
            raise ProxyCommandExited(self.command_line, self._ended(f"broke its output ({error})")) from None
        if data is None:
            raise socket.timeout()
        if not data:
            raise ProxyCommandExited(self.command_line, self._ended("closed its output"))
        self._reads += 1
        if self._reads % 1024 == 0:
            _trim(self._stderr)
        return data

    def close(self) -> None:
        """Close our ends (EOF ends most proxies), stop the group (TERM, then KILL after a grace); safe twice."""
        fds, self._stdin, self._stdout = (self._stdin, self._stdout), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        self._read_status(0)
        if _group_alive(self.pgid):
            self._stopped = self._exit_status is None
            _stop_group(self.pgid)

    def outcome(self) -> str:
        """What became of the command, for an error message: its exit status (or that it was stopped) and stderr."""
        self._read_status(0)
        if self._exit_status is not None:
            how = f"exited {self._exit_status}"
        elif self._stopped:
            how = "was still running, so it was stopped"
        else:
            how = "is still running"
        return f"ProxyCommand `{self.command_line}` {how}{_tail(self._stderr)}"

    @property
    def closed(self) -> bool:
        return self._stdin < 0 or not _group_alive(self.pgid)

    @property
    def _closed(self) -> bool:
        return self.closed

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def __del__(self) -> None:
        """The stderr file and the status pipe outlive close(): outcome() reads them for the error message."""
        for name in ("_stderr", "_status"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                setattr(self, name, -1)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _ended(self, what: str) -> str:
        """The outcome once the proxy stopped talking: wait a moment for its exit status, which says more."""
        self._read_status(_EXIT_WAIT_SECONDS)
        if self._exit_status is None:
            return f"ProxyCommand `{self.command_line}` {what}{_tail(self._stderr)}"
        return self.outcome()

    def _read_status(self, wait_seconds: float) -> None:
        if self._exit_status is not None:
            return
        ready, _, _ = select.select([self._status], [], [], wait_seconds)
        if ready:
            text = os.read(self._status, 32).strip()
            self._exit_status = int(text) if text.isdigit() else None


def proxy_outcome(sock: object, error: BaseException) -> str:
    """``"; ProxyCommand `…` was still running…"`` for a DetachedProxyCommand, unless ``error`` already says it."""
    if not isinstance(sock, DetachedProxyCommand) or isinstance(error, ProxyCommandExited):
        return ""
    return f"; {sock.outcome()}"


def _private_file() -> int:
    """An unlinked temporary file opened for appending (the proxy's stderr); its fd."""
    created, path = tempfile.mkstemp(prefix="relaykernel-proxy-")
    try:
        return os.open(path, os.O_RDWR | os.O_APPEND)
    finally:
        os.close(created)
        os.unlink(path)


def _tail(fd: int) -> str:
    """``": last lines"`` of the stderr file, or ``" (nothing on stderr)"``."""
    size = os.fstat(fd).st_size
    text = os.pread(fd, _STDERR_TAIL_BYTES, max(0, size - _STDERR_TAIL_BYTES)).decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()][-_STDERR_TAIL_LINES:]
    return ": " + " / ".join(lines) if lines else " (nothing on stderr)"


def _trim(fd: int) -> None:
    size = os.fstat(fd).st_size
    if size > _STDERR_CAP_BYTES:
        kept = os.pread(fd, _STDERR_TAIL_BYTES, size - _STDERR_TAIL_BYTES)
        os.ftruncate(fd, 0)
        os.write(fd, kept)  # O_APPEND: the proxy's later lines land after these


def _stop_group(pgid: int) -> None:
    for sig, wait_seconds in ((signal.SIGTERM, _GRACE_SECONDS), (signal.SIGKILL, _GRACE_SECONDS)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_seconds
        while _group_alive(pgid):
            if time.monotonic() > deadline:
                break
            time.sleep(_POLL_SECONDS)
        else:
            return


def _group_alive(pgid: int) -> bool:
    """True while a process of the group runs (zombies waiting for init do not count, where /proc tells)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    members = _group_members(pgid)
    return members is None or any(pid_alive(pid) for pid in members)


def _group_members(pgid: int) -> list[int] | None:
    """The pids in process group ``pgid`` per /proc, or None without /proc."""
    try:
        entries = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    members = []
    for name in entries:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
            if int(fields[2]) == pgid:
                members.append(int(name))
    return members
