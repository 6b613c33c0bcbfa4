"""The remote work dir as the sync sees it: list it, or apply a batch as one tar stream over one exec channel."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import tarfile
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, cast

from paramiko import SSHException

from ..common.errors import VM, LinkDown
from ..ssh.chain import SSHChain
from ..vm.supervisor import BOOTSTRAP
from ..vm.sync_receiver import MTIME_NS_HEADER
from .ignore import LocalFile

_READ_BYTES = 1 << 20


def receiver_script() -> bytes:
    return resources.files("relaykernel.vm").joinpath("sync_receiver.py").read_bytes()


class _ChannelWriter:
    """The write side tarfile needs, on a paramiko channel."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def write(self, data: bytes) -> int:
        self._channel.sendall(data)
        return len(data)


class RemoteTree:
    """One remote work dir, reached through the chain's VM connection (no new SSH connection per batch)."""

    def __init__(self, chain: SSHChain, *, python_argv: Sequence[str], root: str, timeout_seconds: float) -> None:
        self.chain = chain
        self.python_argv = list(python_argv)
        self.root = root
        self.timeout_seconds = timeout_seconds
        self.absolute_root: str | None = None  # as the VM expanded root ("~" and symlinks), once listed

    def listing(self) -> dict[str, tuple[int, int]]:
        """path -> (size, mtime_ns) of every file in the remote work dir."""
        event = self._exchange({"op": "list", "root": self.root}, payload=None)
        self.absolute_root = str(event["root"])
        return {path: (int(size), int(mtime)) for path, (size, mtime) in event["files"].items()}

    def apply(self, local_root: Path, files: Sequence[LocalFile], deletes: Sequence[str]) -> dict[str, Any]:
        """Write ``files`` (atomically, with their mtimes) and delete ``deletes``; the receiver's report."""
        mtimes = {file.path: file.mtime_ns for file in files}
        return self._exchange({"op": "apply", "root": self.root, "delete": list(deletes), "mtimes": mtimes},
                              payload=(local_root, files))

    def fetch(self, local_root: Path, targets: dict[str, str]) -> list[LocalFile]:
        """Copy remote paths to local ones (remote -> local relative path), each renamed into place whole."""
        fetched = []
        with self._receiver({"op": "pack", "root": self.root, "paths": sorted(targets)}, "fetching outputs") as channel:
            channel.shutdown_write()
            with tarfile.open(fileobj=channel.makefile("rb"), mode="r|") as archive:
                for member in archive:
                    if member.isfile() and member.name in targets:
                        fetched.append(_receive(archive, member, local_root, targets[member.name]))
        return fetched

    def _exchange(self, request: dict[str, Any], payload: tuple[Path, Sequence[LocalFile]] | None) -> dict[str, Any]:
        with self._receiver(request, "syncing") as channel:
            if payload is not None:
                _send_tar(channel, *payload)
            channel.shutdown_write()
            output = channel.makefile("rb").read()
            status = channel.recv_exit_status()
            stderr = channel.makefile_stderr("rb").read().decode(errors="replace").strip()[-500:]
        lines = output.decode(errors="replace").strip().splitlines()
        if status != 0 or not lines:
            raise LinkDown(VM, self.chain.vm_label, f"the VM's sync receiver failed (exit {status}): {stderr}",
                           "check remote_python and the remote work dir")
        event: dict[str, Any] = json.loads(lines[-1])
        return event

    @contextlib.contextmanager
    def _receiver(self, request: dict[str, Any], doing: str) -> Iterator[Any]:
        """The receiver started on the VM with ``request`` sent; any cut becomes LinkDown; always closed."""
        if not self.chain.is_active():
            self.chain.connect()  # rebuilds only what a cut broke; raises a HopError while the VM stays away
        channel = self.chain.open_session()
        try:
            channel.settimeout(self.timeout_seconds)
            channel.exec_command(shlex.join([*self.python_argv, "-c", BOOTSTRAP]))
            script = receiver_script()
            channel.sendall(b"%d\n" % len(script) + script + json.dumps(request).encode() + b"\n")
            yield channel
        except (OSError, EOFError, tarfile.TarError, SSHException) as error:
            raise LinkDown(VM, self.chain.vm_label, f"{doing} ({self.root}) was cut: {error}",
                           "it is retried at the next pass, once the link is back") from None
        finally:
            channel.close()


def _send_tar(channel: Any, local_root: Path, files: Sequence[LocalFile]) -> None:
    """Stream each file as it is now, stamped with the mtime the batch recorded (the request carries it in ns).

    A file that changed since it was scanned still goes whole; its newer mtime makes the next pass send it again.
    """
    writer = cast(Any, _ChannelWriter(channel))
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.GNU_FORMAT, bufsize=_READ_BYTES) as archive:
        for file in files:
            try:
                with open(local_root / file.path, "rb") as source:
                    size = os.fstat(source.fileno()).st_size
                    member = tarfile.TarInfo(file.path)
                    member.size, member.mode, member.mtime = size, file.mode, file.mtime_ns // 10**9
                    archive.addfile(member, _Exactly(source, size))
            except FileNotFoundError:
                continue  # deleted since the batch was made: its delete event follows


def _receive(archive: tarfile.TarFile, member: tarfile.TarInfo, local_root: Path, path: str) -> LocalFile:
    """Write one member under a temporary name beside its target, then rename it into place with its mtime."""
    target = local_root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.rk-tmp")
    source = archive.extractfile(member)
    assert source is not None
    with open(staging, "wb") as out:
        while chunk := source.read(_READ_BYTES):
            out.write(chunk)
    mtime_ns = int(member.pax_headers.get(MTIME_NS_HEADER, int(member.mtime) * 10**9))
    os.chmod(staging, member.mode & 0o777)
    os.utime(staging, ns=(mtime_ns, mtime_ns))
    os.replace(staging, target)
    return LocalFile(path, member.size, mtime_ns, member.mode & 0o777)


class _Exactly:
    """Read exactly ``size`` bytes: a file that shrank meanwhile is padded, so the stream stays well-formed."""

    def __init__(self, source: Any, size: int) -> None:
        self._source = source
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._source.read(n)
        data += b"\0" * (n - len(data))
        self._left -= n
        return data
