"""Verify host keys against known_hosts files, OpenSSH-style."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

import paramiko

from ..common.errors import ChangedHostKey, RevokedHostKey, UnknownHostKey

log = logging.getLogger(__name__)

REVOKED = "@revoked"
CERT_AUTHORITY = "@cert-authority"
# A host known by an RSA key can sign with any of these; plain ssh-rsa (SHA-1) is refused by modern sshd.
_RSA_ALGORITHMS = ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")


def fingerprint(key: paramiko.PKey) -> str:
    """The key's fingerprint as ``ssh-keygen -l`` prints it: ``SHA256:`` and unpadded base64."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def known_hosts_line(name: str, key: paramiko.PKey) -> str:
    """The known_hosts line that trusts ``key`` for ``name``: ``name keytype base64``."""
    return f"{name} {key.get_name()} {key.get_base64()}"


@dataclass(frozen=True)
class _Entry:
    """One parsed known_hosts line."""

    marker: str | None
    hosts: str
    key_type: str
    blob: bytes
    origin: str  # "file:line", for messages

    def lists(self, name: str) -> bool:
        """Whether this line's host field names ``name`` (already lowercase)."""
        if self.hosts.startswith("|"):
            return _hashed_host_matches(self.hosts, name)
        return _patterns_match(self.hosts.lower(), name)


class KnownHosts:
    """The known_hosts lines of several files; any matching line trusts a key, as in OpenSSH."""

    def __init__(self, files: Sequence[str]) -> None:
        self.files = tuple(files)
        self._entries = [entry for path in self.files for entry in _read_entries(path)]

    def key_types_for(self, name: str) -> list[str]:
        """Host-key algorithms that known_hosts can verify for ``name``, in file order (prefer these)."""
        algorithms: dict[str, None] = {}
        for entry in self._listing(name, None):
            kinds = _RSA_ALGORITHMS if entry.key_type == "ssh-rsa" else (entry.key_type,)
            algorithms.update(dict.fromkeys(kinds))
        return list(algorithms)

    def verify(self, *, hop: str, where: str, name: str, key: paramiko.PKey, trust_file: str) -> None:
        """Return if a line trusts ``key`` for ``name``; else raise Revoked-, Changed- or UnknownHostKey."""
        blob, trust_file = key.asbytes(), os.path.expanduser(trust_file)
        revoked = [entry for entry in self._listing(name, REVOKED) if entry.blob == blob]
        if revoked:
            raise _revoked_error(hop, where, name, key, revoked)
        listed = self._listing(name, None)
        if any(entry.blob == blob for entry in listed):
            return
        if listed:
            raise _changed_error(hop, where, name, key, trust_file, listed)
        raise _unknown_error(hop, where, name, key, trust_file, self.files)

    def add(self, name: str, key: paramiko.PKey, trust_file: str) -> None:
        """Trust ``key`` for ``name`` from now on: append its line to ``trust_file`` (0600, dir 0700)."""
        trust_file = os.path.expanduser(trust_file)
        directory = os.path.dirname(trust_file)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        separator = "\n" if _lacks_final_newline(trust_file) else ""
        descriptor = os.open(trust_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "a", encoding="utf-8") as stream:
            stream.write(f"{separator}{known_hosts_line(name, key)}\n")
        self._entries.append(_Entry(None, name, key.get_name(), key.asbytes(), f"{trust_file} (just added)"))

    def remove(self, name: str, trust_file: str) -> int:
        """Drop the (unmarked) lines of ``trust_file`` that name ``name``, as ``ssh-keygen -R`` does; how many."""
        trust_file, lowered = os.path.expanduser(trust_file), name.lower()
        try:
            with open(trust_file, encoding="utf-8", errors="replace") as stream:
                lines = stream.read().splitlines()
        except FileNotFoundError:
            return 0
        kept = [text for text in lines if not _names_unmarked(text, lowered)]
        staging = f"{trust_file}.{os.getpid()}.tmp"
        descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write("".join(f"{text}\n" for text in kept))
        os.replace(staging, trust_file)
        self._entries = [entry for path in self.files for entry in _read_entries(path)]
        return len(lines) - len(kept)

    def _listing(self, name: str, marker: str | None) -> list[_Entry]:
        lowered = name.lower()
        return [entry for entry in self._entries if entry.marker == marker and entry.lists(lowered)]


def _names_unmarked(text: str, lowered_name: str) -> bool:
    entry = _parse_line(text, "")
    return entry is not None and entry.marker is None and entry.lists(lowered_name)


def _lacks_final_newline(path: str) -> bool:
    try:
        with open(path, "rb") as stream:
            if stream.seek(0, os.SEEK_END) == 0:
                return False
            stream.seek(-1, os.SEEK_END)
            return stream.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _read_entries(path: str) -> list[_Entry]:
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            lines = stream.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as error:
        log.debug("skipping known_hosts file %s: %s", path, error)
        return []
    parsed = (_parse_line(text, f"{path}:{number}") for number, text in enumerate(lines, start=1))
    return [entry for entry in parsed if entry is not None]


def _parse_line(text: str, origin: str) -> _Entry | None:
    fields = text.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = fields.pop(0) if fields[0].startswith("@") else None
    if marker not in (None, REVOKED, CERT_AUTHORITY) or len(fields) < 3:
        log.debug("skipping %s: not a known_hosts line", origin)
        return None
    try:
        blob = base64.b64decode(fields[2], validate=True)
    except binascii.Error:
        log.debug("skipping %s: key is not base64", origin)
        return None
    return _Entry(marker, fields[0], fields[1], blob, origin)


def _hashed_host_matches(field: str, name: str) -> bool:
    """``|1|salt|hash`` where hash = HMAC-SHA1(salt, name), as written by ``ssh-keygen -H``."""
    parts = field.split("|")
    if len(parts) != 4 or parts[1] != "1":
        return False
    try:
        salt, expected = base64.b64decode(parts[2]), base64.b64decode(parts[3])
    except binascii.Error:
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), expected)


def _patterns_match(field: str, name: str) -> bool:
    """OpenSSH pattern lists: any positive pattern must match and no ``!negated`` one may."""
    matched = False
    for pattern in field.split(","):
        negated = pattern.startswith("!")
        if _glob(pattern[1:] if negated else pattern).fullmatch(name):
            if negated:
                return False
            matched = True
    return matched


@functools.lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    """Only ``*`` and ``?`` are special, so ``[host]:port`` stays literal."""
    parts = (".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern)
    return re.compile("".join(parts), re.DOTALL)


def _describe(key: paramiko.PKey) -> str:
    return f"{key.get_name()} key {fingerprint(key)}"


def _append_command(line: str, trust_file: str) -> str:
    command = f"echo {shlex.quote(line)} >> {shlex.quote(trust_file)}"
    directory = os.path.dirname(trust_file)
    if directory and not os.path.isdir(directory):
        command = f"mkdir -p -m 700 {shlex.quote(directory)} && {command}"
    return command


def _revoked_error(
    hop: str, where: str, name: str, key: paramiko.PKey, lines: list[_Entry]
) -> RevokedHostKey:
    origins = ", ".join(entry.origin for entry in lines)
    problem = f"host key for {name} is REVOKED: it presents {_describe(key)}, marked @revoked at {origins}"
    fix = "do not connect; the host needs a new host key (remove the @revoked line only if it was a mistake)"
    return RevokedHostKey(hop, where, problem, fix, fingerprint=fingerprint(key))


def _changed_error(
    hop: str, where: str, name: str, key: paramiko.PKey, trust_file: str, lines: list[_Entry]
) -> ChangedHostKey:
    origins = ", ".join(entry.origin for entry in lines)
    problem = (
        f"host key for {name} has CHANGED: it now presents {_describe(key)}, but {origins} holds a "
        "different key. Expected if the VM was recreated (a new VM has a new host key); otherwise the "
        "connection may be intercepted"
    )
    command = _append_command(known_hosts_line(name, key), trust_file)
    if os.path.isfile(trust_file):
        command = f"ssh-keygen -f {shlex.quote(trust_file)} -R {shlex.quote(name)} && {command}"
    fix = f"if you expect a new host key, replace the old one: {command}"
    return ChangedHostKey(hop, where, problem, fix, fingerprint=fingerprint(key))


def _unknown_error(
    hop: str, where: str, name: str, key: paramiko.PKey, trust_file: str, files: Sequence[str]
) -> UnknownHostKey:
    searched = ", ".join(files) or "no known_hosts files"
    problem = f"host key for {name} is unknown (searched {searched}): it presents {_describe(key)}"
    command = _append_command(known_hosts_line(name, key), trust_file)
    check = "check that fingerprint on the host (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub)"
    fix = f"{check}, then trust it: {command}"
    return UnknownHostKey(hop, where, problem, fix, fingerprint=fingerprint(key))
