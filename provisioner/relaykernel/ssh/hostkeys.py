"""Verify host keys against known_hosts files, OpenSSH-style."""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
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

from ..common.errors import ConfigError
from .hostkey_errors import changed_error, fingerprint, known_hosts_line, revoked_error, unknown_error, unpinned_error

log = logging.getLogger(__name__)

REVOKED = "@revoked"
CERT_AUTHORITY = "@cert-authority"
# A host known by an RSA key can sign with any of these; plain ssh-rsa (SHA-1) is refused by modern sshd.
_RSA_ALGORITHMS = ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")
# (known_hosts file, host name) -> the key a line pinned for it, as seen in this process: a host whose line was
# removed since (a half-done replace, a hand edit) is never "unknown" to accept_unknown_host_keys again.
_PINNED_THIS_RUN: dict[tuple[str, str], bytes] = {}


@dataclass(frozen=True)
class _Entry:
    """One parsed known_hosts line."""

    marker: str | None
    hosts: str
    key_type: str
    blob: bytes
    origin: str  # "file:line", for messages
    path: str = ""  # the file, absolute

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

    def verify(
        self, *, hop: str, where: str, name: str, key: paramiko.PKey, trust_file: str, dest: str = "",
        accept_unknown: bool = False,
    ) -> None:
        """Return if a line trusts ``key`` for ``name``; else raise Revoked-, Changed- or UnknownHostKey.

        ``accept_unknown`` records a key for a host no line names, unless this process saw a pinned key for it
        (its line was removed since): that host is refused as changed. ``dest`` (the ssh alias) goes into fixes.
        """
        blob, trust_file = key.asbytes(), os.path.expanduser(trust_file)
        revoked = [entry for entry in self._listing(name, REVOKED) if entry.blob == blob]
        if revoked:
            raise revoked_error(hop, where, name, key, [entry.origin for entry in revoked])
        listed = self._listing(name, None)
        if any(entry.blob == blob for entry in listed):
            _PINNED_THIS_RUN[_pin_id(trust_file, name)] = blob
            return
        if listed:
            raise changed_error(hop, where, name, key, trust_file, [entry.origin for entry in listed], dest)
        if not accept_unknown:
            raise unknown_error(hop, where, name, key, trust_file, self.files, dest)
        pinned = _PINNED_THIS_RUN.get(_pin_id(trust_file, name))
        if pinned == blob:
            log.warning("%s is no longer listed in %s; trusting the key it had earlier in this run, not recording "
                        "it again: %s", name, trust_file, fingerprint(key))
            return
        if pinned is not None:
            raise unpinned_error(hop, where, name, key, trust_file, dest)
        log.warning("trusting new host key %s for %s (accept_unknown_host_keys)", fingerprint(key), name)
        self.add(name, key, trust_file)

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
        origin, path = f"{trust_file} (just added)", os.path.abspath(trust_file)
        self._entries.append(_Entry(None, name, key.get_name(), key.asbytes(), origin, path))
        _PINNED_THIS_RUN[_pin_id(trust_file, name)] = key.asbytes()

    def remove(self, name: str, trust_file: str) -> int:
        """Drop the (unmarked) lines of ``trust_file`` that name ``name``, as ``ssh-keygen -R`` does; how many."""
        return self._rewrite(name, trust_file, None)

    def replace(self, name: str, key: paramiko.PKey, trust_file: str) -> int:
        """Swap every (unmarked) line naming ``name`` for one trusting ``key``, in one atomic rename; how many.

        ConfigError, with nothing written, when another of the files holds a different key for ``name``: only
        ``trust_file`` is edited, so that line would still refuse the host.
        """
        path, blob = os.path.abspath(os.path.expanduser(trust_file)), key.asbytes()
        elsewhere = [e.origin for e in self._listing(name, None) if e.path != path and e.blob != blob]
        if elsewhere:
            raise ConfigError(f"{', '.join(elsewhere)} also holds a different key for {name} and is not edited here: "
                              f"remove that line (ssh-keygen -f FILE -R {shlex.quote(name)}), then run this again")
        return self._rewrite(name, trust_file, key)

    def _rewrite(self, name: str, trust_file: str, key: paramiko.PKey | None) -> int:
        trust_file, lowered = os.path.expanduser(trust_file), name.lower()
        try:
            with open(trust_file, encoding="utf-8", errors="replace") as stream:
                lines = stream.read().splitlines()
        except FileNotFoundError:
            if key is None:
                return 0
            lines = []
        kept = [text for text in lines if not _names_unmarked(text, lowered)]
        added = [known_hosts_line(name, key)] if key is not None else []
        _write_atomically(trust_file, kept + added)
        self._entries = [entry for path in self.files for entry in _read_entries(path)]
        if key is not None:
            _PINNED_THIS_RUN[_pin_id(trust_file, name)] = key.asbytes()
        return len(lines) - len(kept)

    def _listing(self, name: str, marker: str | None) -> list[_Entry]:
        lowered = name.lower()
        return [entry for entry in self._entries if entry.marker == marker and entry.lists(lowered)]


def _pin_id(trust_file: str, name: str) -> tuple[str, str]:
    return os.path.abspath(os.path.expanduser(trust_file)), name.lower()


def _write_atomically(path: str, lines: list[str]) -> None:
    """Write ``lines`` to a 0600 file beside ``path`` and rename it over ``path``: readers see old or new, whole."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    staging = f"{path}.{os.getpid()}.tmp"
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write("".join(f"{text}\n" for text in lines))
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise


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
    absolute = os.path.abspath(os.path.expanduser(path))
    return [dataclasses.replace(entry, path=absolute) for entry in parsed if entry is not None]


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
