"""Public-key authentication for one hop: the named key, then ssh-agent, then ssh config's keys."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import paramiko

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
        remaining = transport.auth_publickey(user, key)
    except paramiko.AuthenticationException:
        return False
    except (paramiko.SSHException, OSError, EOFError) as error:
        raise LinkDown(name, where, f"the connection dropped during authentication ({error})", "") from None
    return not remaining


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
