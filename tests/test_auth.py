"""Logging in: ssh-agent keys leave no agent connection open; pipelined requests survive refusals, RSA keys and an
accept read at once."""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from paramiko.common import MSG_SERVICE_REQUEST, MSG_USERAUTH_REQUEST

from helpers import VM_ALIAS, wait_until, write_ssh_config
from relaykernel.options import RelayOptions
from relaykernel.relayed import build_chain
from relaykernel.sandbox.sshd import SshdServer
from relaykernel.ssh.auth import _PipelinedAuth


@pytest.fixture
def agent(topology, tmp_path, monkeypatch) -> Iterator[subprocess.Popen[bytes]]:
    """A private ssh-agent holding the topology's key, as SSH_AUTH_SOCK."""
    socket_path = tmp_path / "agent.sock"
    process = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        assert wait_until(socket_path.exists, 5), "ssh-agent did not start"
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        subprocess.run(["ssh-add", "-q", topology.identity_file], check=True, capture_output=True, timeout=10)
        yield process
    finally:
        process.terminate()
        process.wait(10)


def agent_clients(agent: subprocess.Popen[bytes]) -> int:
    """Sockets the agent holds open besides its listening one: one per connected client."""
    links = []
    for fd in Path(f"/proc/{agent.pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            links.append(os.readlink(fd))
    return sum(1 for link in links if link.startswith("socket:")) - 1


def test_agent_connections_close_after_each_hop_logs_in(topology, tmp_path, agent):
    config = write_ssh_config(topology, tmp_path, identity_file=tmp_path / "not_there", identities_only="no")
    chain = build_chain(RelayOptions(host=VM_ALIAS, ssh_config_file=config, connect_timeout_seconds=10.0))
    try:
        for _ in range(3):  # a reconnect authenticates again: nothing may pile up
            chain.connect()
            assert chain.is_active()
            assert wait_until(lambda: agent_clients(agent) == 0, 5), f"{agent_clients(agent)} agent links left open"
            chain.drop(keep_relays=False)
    finally:
        chain.close()


@pytest.fixture
def rsa_sshd(tmp_path) -> Iterator[tuple[SshdServer, Path, Path]]:
    """An sshd of its own that accepts only a fresh RSA key; also a fresh ed25519 key it refuses."""
    rsa, refused = tmp_path / "id_rsa", tmp_path / "id_refused"
    for path, kind in ((rsa, "rsa"), (refused, "ed25519")):
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True, timeout=30)
    user = pwd.getpwuid(os.getuid()).pw_name
    sshd = SshdServer(state_dir=tmp_path / "sshd", authorized_keys={user: [rsa.with_suffix(".pub").read_text()]})
    sshd.start()
    try:
        yield sshd, rsa, refused
    finally:
        sshd.stop()


def test_a_refused_key_then_an_rsa_key_log_in_with_pipelined_requests(rsa_sshd, tmp_path):
    """Each attempt sends its userauth request behind its service request: a refusal moves on to the next key, and
    an RSA key (its algorithm waits for the server's server-sig-algs) logs in with SHA-2."""
    sshd, rsa, refused = rsa_sshd
    known = tmp_path / "known_hosts"
    known.write_text(sshd.host_key_line() + "\n")
    config = tmp_path / "ssh_config"
    config.write_text(f"""Host lone
    HostName 127.0.0.1
    Port {sshd.port}
    User {pwd.getpwuid(os.getuid()).pw_name}
    IdentityFile {refused}
    IdentityFile {rsa}
    IdentitiesOnly yes
    UserKnownHostsFile {known}
    StrictHostKeyChecking yes
""")
    chain = build_chain(RelayOptions(host="lone", ssh_config_file=str(config), connect_timeout_seconds=10.0))
    try:
        chain.connect()
        assert chain.is_active()
        transport = chain.vm_transport()
        assert transport.is_authenticated()
        assert transport._agreed_pubkey_algorithm in ("rsa-sha2-256", "rsa-sha2-512")
        status, out, _ = chain.run_program(["python3"], zlib.compress(b"print('hello from the bootstrap')"), [],
                                           timeout_seconds=20)
        assert (status, out.strip()) == (0, "hello from the bootstrap")
    finally:
        chain.close()


class _InstantAccept:
    """The transport side of a zero-delay path: the server's service accept is handled before the send returns."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.server_extensions: dict[str, bytes] = {}
        self.session_id = b"s" * 32
        self.sent: list[int] = []
        self.handler: _PipelinedAuth | None = None

    def _log(self, *args: object) -> None:
        pass

    def _send_message(self, message: paramiko.Message) -> None:
        kind = message.asbytes()[0]
        self.sent.append(kind)
        if kind == MSG_SERVICE_REQUEST:
            accepted = paramiko.Message()
            accepted.add_string("ssh-userauth")
            accepted.rewind()
            assert self.handler is not None
            self.handler._parse_service_accept(accepted)


def test_a_service_accept_read_at_once_still_gets_one_userauth_request():
    """On a short path the accept can be handled before the pipelining decision: never two userauth requests (the
    server answers the second, after its success, with UNIMPLEMENTED)."""
    transport = _InstantAccept()
    handler = _PipelinedAuth(transport)
    transport.handler = handler
    handler.auth_publickey("someone", paramiko.ECDSAKey.generate(bits=256), threading.Event())
    assert transport.sent == [MSG_SERVICE_REQUEST, MSG_USERAUTH_REQUEST]
