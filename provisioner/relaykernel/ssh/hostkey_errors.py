"""What a refused host key says: the fingerprint, which line disagrees, why it may have changed, and the one fix."""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
from collections.abc import Sequence

import paramiko

from ..common.errors import VM, ChangedHostKey, RevokedHostKey, UnknownHostKey


def fingerprint(key: paramiko.PKey) -> str:
    """The key's fingerprint as ``ssh-keygen -l`` prints it: ``SHA256:`` and unpadded base64."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def known_hosts_line(name: str, key: paramiko.PKey) -> str:
    """The known_hosts line that trusts ``key`` for ``name``: ``name keytype base64``."""
    return f"{name} {key.get_name()} {key.get_base64()}"


def _describe(key: paramiko.PKey) -> str:
    return f"{key.get_name()} key {fingerprint(key)}"


def _append_command(line: str, trust_file: str) -> str:
    command = f"echo {shlex.quote(line)} >> {shlex.quote(trust_file)}"
    directory = os.path.dirname(trust_file)
    if directory and not os.path.isdir(directory):
        command = f"mkdir -p -m 700 {shlex.quote(directory)} && {command}"
    return command


def revoked_error(
    hop: str, where: str, name: str, key: paramiko.PKey, origins: Sequence[str]
) -> RevokedHostKey:
    problem = f"host key for {name} is REVOKED: it presents {_describe(key)}, marked @revoked at {', '.join(origins)}"
    fix = "do not connect; the host needs a new host key (remove the @revoked line only if it was a mistake)"
    return RevokedHostKey(hop, where, problem, fix, fingerprint=fingerprint(key))


def changed_error(
    hop: str, where: str, name: str, key: paramiko.PKey, trust_file: str, origins: Sequence[str], dest: str = ""
) -> ChangedHostKey:
    seen = fingerprint(key)
    held = ", ".join(origins)
    problem = f"host key for {name} has CHANGED: it now presents {_describe(key)}, but {held} holds a different key"
    command = _append_command(known_hosts_line(name, key), trust_file)
    if os.path.isfile(trust_file):
        command = f"ssh-keygen -f {shlex.quote(trust_file)} -R {shlex.quote(name)} && {command}"
    if hop != VM:
        problem += (". A relay's host key changes only when its keys were regenerated (a reinstall, a new machine "
                    "at the same address); otherwise the connection may be intercepted")
        fix = ("ask the relay's administrator for its fingerprint (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub "
               f"on the relay); only if it is {seen}, replace the old key: {command}")
        return ChangedHostKey(hop, where, problem, fix, fingerprint=seen)
    problem += (". Expected if the VM was recreated without its kept host key (a new VM has a new host key); "
                "otherwise the connection may be intercepted")
    if dest:
        command = f"relaykernel trust {shlex.quote(dest)} --replace --fingerprint {seen}"
    fix = f"only if {seen} is the fingerprint the VM's cell printed, replace the old key: {command}"
    return ChangedHostKey(hop, where, problem, fix, fingerprint=seen)


def unpinned_error(
    hop: str, where: str, name: str, key: paramiko.PKey, trust_file: str, dest: str
) -> ChangedHostKey:
    problem = (f"host key for {name} has CHANGED: it now presents {_describe(key)}, but {trust_file} held another "
               "key for it earlier in this run and that line was removed since; accept_unknown_host_keys never "
               "applies to a host that had a pinned key")
    seen = fingerprint(key)
    command = _append_command(known_hosts_line(name, key), trust_file)
    if dest and hop == VM:
        command = f"relaykernel trust {shlex.quote(dest)} --fingerprint {seen}"
    fix = f"only if {seen} is the host's real fingerprint, trust it: {command}"
    return ChangedHostKey(hop, where, problem, fix, fingerprint=seen)


def unknown_error(
    hop: str, where: str, name: str, key: paramiko.PKey, trust_file: str, files: Sequence[str], dest: str = ""
) -> UnknownHostKey:
    searched = ", ".join(files) or "no known_hosts files"
    problem = f"host key for {name} is unknown (searched {searched}): it presents {_describe(key)}"
    seen = fingerprint(key)
    if dest and hop == VM:
        command = f"relaykernel trust {shlex.quote(dest)} --fingerprint {seen}"
        fix = f"check that {seen} is the fingerprint the VM's cell printed, then trust it: {command}"
        return UnknownHostKey(hop, where, problem, fix, fingerprint=seen)
    command = _append_command(known_hosts_line(name, key), trust_file)
    check = "check that fingerprint on the host (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub)"
    fix = f"{check}, then trust it: {command}"
    return UnknownHostKey(hop, where, problem, fix, fingerprint=seen)
