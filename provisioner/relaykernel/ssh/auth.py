"""Public-key authentication for one hop: the named key, then ssh-agent, then ssh config's keys.

Each attempt sends the userauth request right behind its service request instead of waiting a round trip for the
service to be accepted (the server reads them in order): one round trip per hop, on every connect and reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import paramiko
from paramiko.auth_handler import AuthHandler

from ..common.errors import AuthError, LinkDown

if TYPE_CHECKING:
    from .chain import ChainPolicy
    from .config import HopSettings

log = logging.getLogger(__name__)


def authenticate(
    transport: paramiko.Transport, hop: HopSettings, name: str, where: str, policy: ChainPolicy
) -> None:
    """Try each candidate key in OpenSSH's order; AuthError listing what was tried when none works."""
    tried: list[str] = []
    skipped: list[str] = []
    with contextlib.closing(_candidate_keys(hop, policy, skipped)) as candidates:  # closing ends the agent link
        for label, key in candidates:
            tried.append(label)
            if _try_key(transport, hop.user, key, name, where):
                return
    raise AuthError(name, where, _auth_problem(hop.user, tried, skipped), _auth_fix(hop, tried))


def _try_key(transport: paramiko.Transport, user: str, key: paramiko.PKey, name: str, where: str) -> bool:
    try:
        remaining = _auth_publickey(transport, user, key)
    except paramiko.AuthenticationException:
        return False
    except (paramiko.SSHException, OSError, EOFError) as error:
        raise LinkDown(name, where, f"the connection dropped during authentication ({error})", "") from None
    return not remaining


def _auth_publickey(transport: paramiko.Transport, user: str, key: paramiko.PKey) -> list[str]:
    """``Transport.auth_publickey`` with the request pipelined behind the service request (``_PipelinedAuth``)."""
    if not transport.is_active() or not transport.initial_kex_done:
        raise paramiko.SSHException("no SSH session to authenticate on")
    done = threading.Event()
    handler = _PipelinedAuth(transport)
    transport.auth_handler = handler
    handler.auth_publickey(user, key, done)
    return handler.wait_for_response(done)  # type: ignore[no-any-return]


class _PipelinedAuth(AuthHandler):  # type: ignore[misc]
    """paramiko's client auth, minus the wait for the service accept before the userauth request.

    An RSA key's signature algorithm depends on the server's ``server-sig-algs``, which may not have been read yet
    right after the key exchange: such a key waits for the accept as usual.
    """

    _pipelined = False

    def _request_auth(self) -> None:
        # Decided before the service request leaves: on a short path its accept can be read (and, unless pipelined,
        # answered with a userauth request) before this thread runs on, and a second request after a success is one
        # the server does not expect (it answers UNIMPLEMENTED, which paramiko prints as "Oops, unhandled type 3").
        key_type, _ = self._get_key_type_and_bits(self.private_key)
        self._pipelined = "rsa" not in key_type or "server-sig-algs" in self.transport.server_extensions
        super()._request_auth()
        if self._pipelined:
            accepted = paramiko.Message()
            accepted.add_string("ssh-userauth")
            accepted.rewind()
            super()._parse_service_accept(accepted)

    def _parse_service_accept(self, message: paramiko.Message) -> None:
        if not self._pipelined:
            super()._parse_service_accept(message)


def _candidate_keys(
    hop: HopSettings, policy: ChainPolicy, skipped: list[str]
) -> Generator[tuple[str, paramiko.PKey], None, None]:
    seen: set[str] = set()
    if policy.identity_file:
        yield from _file_key(policy.identity_file, skipped, seen)
    if not hop.identities_only:
        yield from _agent_keys(seen)
    for path in hop.identity_files:
        yield from _file_key(path, skipped, seen)


def _file_key(path: str, skipped: list[str], seen: set[str]) -> Iterator[tuple[str, paramiko.PKey]]:
    path = os.path.expanduser(path)
    if path in seen or not os.path.exists(path):
        return
    seen.add(path)
    try:
        key = paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        skipped.append(f"{path} (passphrase-protected: add it to ssh-agent with ssh-add)")
        return
    except (paramiko.SSHException, OSError, ValueError) as error:
        skipped.append(f"{path} (unreadable: {error})")
        return
    yield path, key


def _agent_keys(seen: set[str]) -> Iterator[tuple[str, paramiko.PKey]]:
    """The agent's keys; its socket stays open while they may sign, and closes when the caller is done with them."""
    if not os.environ.get("SSH_AUTH_SOCK"):
        return
    try:
        agent = paramiko.Agent()
    except paramiko.SSHException as error:
        log.debug("ssh-agent unavailable: %s", error)
        return
    try:
        for key in agent.get_keys():
            label = f"ssh-agent key {key.fingerprint}"
            if label not in seen:
                seen.add(label)
                yield label, key
    finally:
        agent.close()


def _auth_problem(user: str, tried: list[str], skipped: list[str]) -> str:
    if not tried and not skipped:
        return f"no key to log in as {user!r} (no ssh-agent keys, no identity files found)"
    parts = [f"refused every key for user {user!r}"]
    if tried:
        parts.append("tried: " + ", ".join(tried))
    if skipped:
        parts.append("skipped: " + ", ".join(skipped))
    return "; ".join(parts)


def _auth_fix(hop: HopSettings, tried: list[str]) -> str:
    if not tried:
        return "name a key with IdentityFile in ssh config (or --identity-file), or load one into ssh-agent"
    return (
        f"check the user name ({hop.user!r}) and that your public key is in that user's "
        "~/.ssh/authorized_keys on this host"
    )
