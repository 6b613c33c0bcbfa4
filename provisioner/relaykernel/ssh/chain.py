"""An authenticated SSH path to the VM: each hop's Transport runs over the previous hop's channel."""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import paramiko
from paramiko import ProxyCommand
from paramiko.common import cMSG_CHANNEL_REQUEST

from ..common.errors import RELAY, VM, ConnectError, ForwardRefused, HopError, LinkDown
from ..common.protocol import BOOTSTRAP
from ..logs import step
from .auth import authenticate
from .config import HopSettings
from .hostkeys import KnownHosts
from .jump import JumpSocket
from .proxy import DetachedProxyCommand, proxy_outcome
from .spare import SpareProgram

log = logging.getLogger(__name__)

TRANSPORT_LOGGER = "relaykernel.ssh.transport"
"""Where our paramiko Transports log (not 'paramiko.transport'), so their noise can be filtered here alone."""


class _RefusedOpenFilter(logging.Filter):
    """Drop paramiko's ERROR per refused channel open: we raise ForwardRefused and log each outage once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "open FAILED" not in str(record.msg)


logging.getLogger(TRANSPORT_LOGGER).addFilter(_RefusedOpenFilter())

# GCM first: measured fastest on pulls (FACTS); the rest keep paramiko's order.
_FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_CHANNEL_OPEN_FAILED = {1: "administratively prohibited", 2: "connect failed"}
JUMP_WINDOW_BYTES = 32 * 1024 * 1024  # above the kernel channel's largest window (pacing.MAXIMUM_BYTES)


def describe(hop: HopSettings) -> str:
    """A hop as people read it: user@host:port, with the alias when it differs."""
    address = f"{hop.user}@{hop.hostname}:{hop.port}"
    return address if hop.alias in (hop.hostname, address) else f"{hop.alias} ({address})"


@dataclass
class ChainPolicy:
    """How the chain connects: credentials, trust and time limits."""

    identity_file: str | None = None
    accept_unknown_host_keys: bool = False
    connect_timeout_seconds: float = 15.0
    channel_timeout_seconds: float = 30.0
    keepalive_seconds: float = 15.0
    passphrase_notes: list[str] = field(default_factory=list)


class SSHChain:
    """The relay hop(s) and the VM hop, connected in order; one VM Transport carries everything."""

    def __init__(self, hops: list[HopSettings], policy: ChainPolicy) -> None:
        if not hops:
            raise ValueError("an SSH chain needs at least one hop")
        self.hops = hops
        self.policy = policy
        self._transports: list[paramiko.Transport] = []
        self._lock = threading.Lock()
        self._nodelay_threads: list[threading.Thread] = []
        self._spare = SpareProgram()  # the next kernel start's supervisor, started ahead of need

    def hop_name(self, index: int) -> str:
        """'relay' for jump hosts, 'VM' for the last hop."""
        if index < len(self.hops) - 1:
            return RELAY if len(self.hops) == 2 else f"{RELAY} {index + 1}"
        return VM

    @property
    def vm_label(self) -> str:
        return describe(self.hops[-1])

    def connect(self, hop_count: int | None = None) -> None:
        """Connect every hop not connected yet (all at first, the inner ones after a cut), or the first few."""
        wanted = len(self.hops) if hop_count is None else hop_count
        with self._lock:
            self._drop_dead_tail()
            while len(self._transports) < wanted:
                index = len(self._transports)
                with step(f"SSH to the {self.hop_name(index)} ({describe(self.hops[index])}): connect, keys, auth"):
                    self._transports.append(self._connect_hop(index))

    def run_program(self, python_argv: Sequence[str], program: bytes, args: Sequence[str],
                    timeout_seconds: float) -> tuple[int, str, str]:
        """Run a bundled VM program to its end with ``args`` (never secrets) and no input; (status, stdout, stderr).

        Output is small by contract. The same exec path as every other program (``start_program``).
        """
        channel = self.start_program(python_argv, program, args=args)
        try:
            channel.settimeout(timeout_seconds)
            channel.shutdown_write()
            stdout = channel.makefile("rb").read().decode(errors="replace")
            stderr = channel.makefile_stderr("rb").read().decode(errors="replace")
            return channel.recv_exit_status(), stdout, stderr
        except (OSError, EOFError, paramiko.SSHException) as error:
            raise LinkDown(VM, self.vm_label, f"running a program failed: {_reason(error)}", "") from None
        finally:
            channel.close()

    def relays_active(self) -> bool:
        """True while every jump hop's Transport is up (the VM hop may be down)."""
        relays = self._transports[: len(self.hops) - 1]
        return len(relays) == len(self.hops) - 1 and all(t.is_active() for t in relays)

    def is_active(self) -> bool:
        """True while every hop's Transport is up."""
        transports = self._transports
        return len(transports) == len(self.hops) and all(t.is_active() for t in transports)

    def vm_transport(self) -> paramiko.Transport:
        """The VM's Transport, or LinkDown when it is not up."""
        transports = self._transports
        if len(transports) != len(self.hops) or not transports[-1].is_active():
            raise LinkDown(VM, self.vm_label, "the SSH link is down", "relaykernel reconnects by itself")
        return transports[-1]

    def open_forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> paramiko.Channel:
        """A direct-tcpip channel from the VM to remote_host:remote_port (the VM's own loopback)."""
        return self._open_direct(self.vm_transport(), len(self.hops) - 1, remote_host, remote_port)

    def open_session(self, window_bytes: int | None = None) -> paramiko.Channel:
        """A session channel on the VM, for exec; ``window_bytes`` bounds what the VM may send ahead of our reads."""
        transport = self.vm_transport()
        try:
            return transport.open_session(window_size=window_bytes, timeout=self.policy.channel_timeout_seconds)
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise LinkDown(VM, self.vm_label, f"could not open a session: {_reason(error)}",
                           "relaykernel reconnects by itself; if this persists, check the VM's tunnel") from None

    def prepare_program(self, python_argv: Sequence[str], program: bytes, *, window_bytes: int | None = None,
                        delay_seconds: float = 0.0) -> None:
        """Start ``program`` in the background, after ``delay_seconds``, for the next ``start_program(...,
        spare=True)`` of the same program: that start (a restart) then only sends its first lines. A cut or
        ``close`` discards it."""
        key = _program_key(python_argv, program, window_bytes)
        self._spare.prepare(key, lambda: self._launch(python_argv, program, (), window_bytes), delay_seconds)

    def start_program(self, python_argv: Sequence[str], program: bytes, first_lines: bytes = b"", *,
                      args: Sequence[str] = (), window_bytes: int | None = None,
                      spare: bool = False) -> paramiko.Channel:
        """Run a bundled VM program (``relaykernel.bundle``) and send it ``first_lines``: the one way to run code there.

        The exec request goes without waiting for its reply, with the program and the first lines right behind it
        (they wait only for sshd to open the session's window). With ``spare``, a copy started ahead by
        ``prepare_program`` is used when there is one, and only the first lines go. A python that cannot run shows
        up as the channel closing with status 126/127 and the shell's message on stderr.
        """
        channel = None
        if spare and not args:
            transports = self._transports
            channel = self._spare.take(_program_key(python_argv, program, window_bytes),
                                       transports[-1] if len(transports) == len(self.hops) else None)
        if channel is None:
            channel = self._launch(python_argv, program, args, window_bytes)
        return self._send_start(channel, first_lines)

    def _launch(self, python_argv: Sequence[str], program: bytes, args: Sequence[str],
                window_bytes: int | None) -> paramiko.Channel:
        """A new session running the bootstrap, with ``program`` sent (args: the program's sys.argv[1:])."""
        channel = self.open_session(window_bytes)
        command = shlex.join([*python_argv, "-c", BOOTSTRAP, *args])
        return self._send_start(channel, b"%d\n" % len(program) + program, command)

    def _send_start(self, channel: paramiko.Channel, data: bytes, command: str | None = None) -> paramiko.Channel:
        """Exec ``command`` (if given) and send the program its input; a channel whose command already ended goes
        back for the caller to read why (no such python: status 126/127 and the shell's message), any other failure
        is LinkDown."""
        try:
            if command is not None:
                _exec_without_waiting(channel, command)
            channel.sendall(data)
        except (paramiko.SSHException, OSError, EOFError) as error:
            if channel.exit_status_ready():
                return channel
            channel.close()
            raise LinkDown(VM, self.vm_label, f"starting a program on the VM failed: {_reason(error)}",
                           "relaykernel reconnects by itself; if this persists, check the VM's tunnel") from None
        return channel

    def fetch_vm_host_key(self) -> paramiko.PKey:
        """The VM's host key, seen through the (verified) relays, without trusting or logging in (for trust)."""
        self.connect(len(self.hops) - 1)
        index = len(self.hops) - 1
        sock = self._first_socket(self.hops[index]) if index == 0 else self._open_jump(index)
        transport = paramiko.Transport(sock)
        transport.set_log_channel(TRANSPORT_LOGGER)
        try:
            transport.start_client(timeout=self.policy.connect_timeout_seconds)
            return transport.get_remote_server_key()
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise ConnectError(VM, self.vm_label, f"SSH handshake failed: {error}",
                               "is the VM's tunnel up? Check its heartbeat cell") from None
        finally:
            transport.close()

    def drop(self, *, keep_relays: bool) -> None:
        """Close the VM hop, and the relay hops too unless keep_relays, so connect() rebuilds them."""
        self._spare.discard()
        with self._lock:
            keep = len(self.hops) - 1 if keep_relays else 0
            for transport in reversed(self._transports[keep:]):
                transport.close()
            self._transports = self._transports[:keep]

    def close(self) -> None:
        """Close every hop, innermost first; safe to call twice."""
        self._spare.discard()
        with self._lock:
            for transport in reversed(self._transports):
                transport.close()
            self._transports = []
        for thread in self._nodelay_threads:
            thread.join(timeout=1.0)
        self._nodelay_threads = []
        self._spare.join(self.policy.channel_timeout_seconds)

    def _drop_dead_tail(self) -> None:
        for index, transport in enumerate(self._transports):
            if not transport.is_active():
                for stale in self._transports[index:]:
                    stale.close()
                self._transports = self._transports[:index]
                return

    def _connect_hop(self, index: int) -> paramiko.Transport:
        hop = self.hops[index]
        sock = self._first_socket(hop) if index == 0 else self._open_jump(index)
        transport = self._start_transport(index, sock)
        try:
            authenticate(transport, hop, self.hop_name(index), describe(hop), self.policy)
        except BaseException:
            transport.close()
            raise
        if index < len(self.hops) - 1:
            self._switch_on_nodelay(transport)
        return transport

    def _first_socket(self, hop: HopSettings) -> socket.socket | ProxyCommand:
        if hop.proxy_command:
            return DetachedProxyCommand(hop.proxy_command) if os.name == "posix" else ProxyCommand(hop.proxy_command)
        timeout = hop.connect_timeout_seconds or self.policy.connect_timeout_seconds
        try:
            sock = socket.create_connection((hop.hostname, hop.port), timeout=timeout)
        except OSError as error:
            raise ConnectError(
                self.hop_name(0),
                describe(hop),
                f"cannot connect: {error.strerror or error}",
                "check the host and port, and that its sshd is running and reachable from here",
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock

    def _open_jump(self, index: int) -> JumpSocket:
        hop = self.hops[index]
        # The next hop's whole connection runs in this channel: its window must never be the cap. What is in flight
        # inside is bounded by the inner channels' own windows (the kernel's is sized to the link: pacing.py).
        return JumpSocket(self._open_direct(self._transports[index - 1], index - 1, hop.hostname, hop.port,
                                            window_bytes=JUMP_WINDOW_BYTES))

    def _open_direct(
        self, transport: paramiko.Transport, index: int, host: str, port: int, window_bytes: int | None = None
    ) -> paramiko.Channel:
        name, where = self.hop_name(index), describe(self.hops[index])
        try:
            return transport.open_channel(
                "direct-tcpip", (host, port), ("127.0.0.1", 0), window_size=window_bytes,
                timeout=self.policy.channel_timeout_seconds,
            )
        except paramiko.ChannelException as error:
            raise _refused(name, where, host, port, error.code, index < len(self.hops) - 1) from None
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise LinkDown(name, where, f"the connection dropped opening {host}:{port} ({error})", "") from None

    def _start_transport(self, index: int, sock: object) -> paramiko.Transport:
        hop, name = self.hops[index], self.hop_name(index)
        transport = paramiko.Transport(sock)
        transport.set_log_channel(TRANSPORT_LOGGER)
        known = KnownHosts(hop.known_hosts_files)
        _prefer_fast_and_known(transport, known.key_types_for(hop.known_hosts_name))
        if hop.server_alive_interval_seconds:
            transport.set_keepalive(int(max(1, hop.server_alive_interval_seconds)))
        timeout = hop.connect_timeout_seconds or self.policy.connect_timeout_seconds
        try:
            transport.start_client(timeout=timeout)
            if not transport.is_active() or transport.host_key is None:  # start_client's timeout returns quietly
                raise paramiko.SSHException(f"no answer within {timeout:g} s")
        except (paramiko.SSHException, OSError, EOFError) as error:
            transport.close()
            raise ConnectError(
                name, describe(hop),
                f"SSH handshake failed: {error or type(error).__name__}{proxy_outcome(sock, error)}",
                "run the ProxyCommand in a terminal to see why it fails" if hop.proxy_command and index == 0
                else "is an SSH server listening there, and is the path to it up?"
            ) from None
        self._check_host_key(transport, index, known)
        return transport

    def _check_host_key(self, transport: paramiko.Transport, index: int, known: KnownHosts) -> None:
        """Verify the hop's host key (recording it only for a host never pinned); close the transport on refusal."""
        hop, name = self.hops[index], self.hop_name(index)
        trust_file = hop.known_hosts_files[0] if hop.known_hosts_files else "~/.ssh/known_hosts"
        try:
            key = transport.get_remote_server_key()
            known.verify(hop=name, where=describe(hop), name=hop.known_hosts_name, key=key, trust_file=trust_file,
                         dest=hop.alias, accept_unknown=self.policy.accept_unknown_host_keys)
        except HopError:
            transport.close()
            raise

    def _switch_on_nodelay(self, transport: paramiko.Transport) -> None:
        """Run one exec on a jump connection so its sshd sets TCP_NODELAY (FACTS: Nagle)."""
        thread = threading.Thread(
            target=_exec_true, args=(transport, self.policy.channel_timeout_seconds),
            name="relaykernel-nodelay", daemon=True,
        )
        thread.start()
        self._nodelay_threads.append(thread)


def _program_key(python_argv: Sequence[str], program: bytes, window_bytes: int | None) -> tuple[object, ...]:
    return tuple(python_argv), hashlib.sha256(program).digest(), window_bytes


def _exec_without_waiting(channel: paramiko.Channel, command: str) -> None:
    """paramiko's exec_command without its wait for the reply (want-reply false): the data can follow at once."""
    message = paramiko.Message()
    message.add_byte(cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("exec")
    message.add_boolean(False)
    message.add_string(command)
    channel.transport._send_user_message(message)


def _exec_true(transport: paramiko.Transport, timeout: float) -> None:
    try:
        channel = transport.open_session(timeout=timeout)
        channel.exec_command("true")
        channel.recv_exit_status()
        channel.close()
    except (paramiko.SSHException, OSError, EOFError) as error:
        log.debug("exec on the relay was refused (%s); replies may pay Nagle delays", error)


def _prefer_fast_and_known(transport: paramiko.Transport, known_types: list[str]) -> None:
    options = transport.get_security_options()
    options.ciphers = _FAST_CIPHERS + tuple(c for c in options.ciphers if c not in _FAST_CIPHERS)
    if known_types:
        supported = tuple(options.key_types)
        first = tuple(k for k in known_types if k in supported)
        options.key_types = first + tuple(k for k in supported if k not in first)


def _refused(hop: str, where: str, host: str, port: int, code: int, next_is_vm: bool) -> ForwardRefused:
    reason = _CHANNEL_OPEN_FAILED.get(code, f"code {code}")
    if code == 1 and next_is_vm:
        fix = (
            f"the relay lets your key open only the ports its authorized_keys line names (permitopen): check that "
            f"{host}:{port} is the VM's tunnel port, as the cell's --remote-port, with HostName 127.0.0.1 in your "
            f'ssh config; for another VM, add permitopen="127.0.0.1:{port}" to that line (docs/relay.md)'
        )
    elif code == 1:
        fix = f"this hop does not let your key open {host}:{port} (permitopen, or AllowTcpForwarding no in sshd_config)"
    elif next_is_vm:
        fix = (
            f"nothing listens on {host}:{port} there: is the VM's tunnel up (its heartbeat cell shows it), and is "
            f"{port} the port the cell forwards (--remote-port)?"
        )
    else:
        fix = f"is the service on {host}:{port} running?"
    return ForwardRefused(hop, where, f"refused to open a channel to {host}:{port} ({reason})", fix)


def _reason(error: BaseException) -> str:
    """An exception as a cause people can read, never empty (paramiko raises EOFError() when a connection closes)."""
    if str(error):
        return str(error)
    return "the SSH connection closed" if isinstance(error, EOFError) else type(error).__name__
