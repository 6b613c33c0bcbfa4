"""The remote work dir as the sync sees it: one persistent receiver on the VM, fed request after request."""

from __future__ import annotations

import functools
import json
import os
import tarfile
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bundle import vm_program
from ..common.errors import VM, LinkDown
from ..ssh.chain import SSHChain
from ..vm.sync_receiver import MTIME_NS_HEADER
from .ignore import LocalFile
from .pacing import AckPacer
from .stream import FrameWriter, send_tar

_READ_BYTES = 1 << 20
PULL_WINDOW_BYTES = 256 << 10  # output pulls: a small window, so a big download never crowds out kernel replies
_PACK_ABOVE_BYTES = 4096
_CUT = (OSError, EOFError, tarfile.TarError, ValueError)  # paramiko reports a cut channel as OSError


@functools.cache
def receiver_script() -> bytes:
    return vm_program("relaykernel.vm.sync_receiver")


@dataclass
class RemoteListing:
    """The VM's side of a pass: every file's (size, mtime_ns), and what this source wrote there (size, mtime, hash)."""

    root: str
    files: dict[str, tuple[int, int]]
    manifest: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)  # asked for with the local sizes


@dataclass(frozen=True)
class Batch:
    """One apply: files to write, moves (old, new) to make, paths to delete, same-content files to adopt."""

    files: Sequence[LocalFile] = ()
    deletes: Sequence[str] = ()
    moves: Sequence[tuple[str, str]] = ()
    adopt: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> (mtime_ns, sha256)


def start_receiver(chain: SSHChain, python_argv: Sequence[str], first_line: dict[str, Any], *,
                   window_bytes: int | None = None, timeout_seconds: float) -> Any:
    """The receiver running on the VM with ``first_line`` sent: the one place the sync starts a VM program."""
    if not chain.is_active():
        chain.connect()  # rebuilds only what a cut broke; raises a HopError while the VM stays away
    channel = chain.start_program(python_argv, receiver_script(), json_line(first_line),
                                  window_bytes=window_bytes)
    channel.settimeout(timeout_seconds)
    return channel


def json_line(message: dict[str, Any]) -> bytes:
    """A request as the receiver reads it: one JSON line, or zlib-packed when big (a first sync's sizes, hashes)."""
    text = json.dumps(message, separators=(",", ":")).encode()
    if len(text) < _PACK_ABOVE_BYTES:
        return text + b"\n"
    packed = zlib.compress(text, 6)
    return b"Z%d\n" % len(packed) + packed


class _Lines:
    """JSON lines from a channel; ``block=False`` returns None when no whole line has arrived yet."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._buffer = bytearray()

    def next(self) -> dict[str, Any]:
        event = self.poll(block=True)
        assert event is not None
        return event

    def poll(self, *, block: bool) -> dict[str, Any] | None:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                event: dict[str, Any] = json.loads(line)
                return event
            if not block and not self.channel.recv_ready():
                return None
            data = self.channel.recv(1 << 16)
            if not data:
                raise EOFError("the VM's sync receiver ended")
            self._buffer += data


class RemoteTree:
    """One remote work dir, served by one receiver process per link (restarted after a cut)."""

    def __init__(self, chain: SSHChain, *, python_argv: Sequence[str], root: str, timeout_seconds: float,
                 source: str = "") -> None:
        self.chain = chain
        self.python_argv = list(python_argv)
        self.root = root
        self.source = source
        self.timeout_seconds = timeout_seconds
        self.absolute_root: str | None = None  # as the VM expanded root ("~" and symlinks), once listed
        self.pacer = AckPacer()
        self._channel: Any = None
        self._lines: _Lines | None = None
        self._unanswered = 0  # answers still due to requests nobody waits for (the session's first)
        self._lock = threading.Lock()

    def listing(self, under: Sequence[str] | None = None, sizes: dict[str, int] | None = None) -> RemoteListing:
        """Every file (or those below ``under``) with its (size, mtime_ns), and this source's manifest.

        With ``sizes`` (the local files'), the VM also hashes each file of the same size there that the manifest
        does not vouch for: what the first sync compares by content, in the same round trip.
        """
        event = self._request({"op": "list", "under": list(under) if under is not None else None,
                               "source": self.source, "sizes": sizes}, "listing")
        self.absolute_root = str(event["root"])
        return RemoteListing(
            root=self.absolute_root,
            files={path: (int(size), int(mtime)) for path, (size, mtime) in event["files"].items()},
            manifest={path: (int(e[0]), int(e[1]), str(e[2])) for path, e in event.get("manifest", {}).items()},
            hashes=dict(event.get("hashes", {})),
        )

    def hashes(self, paths: Sequence[str]) -> dict[str, str]:
        """sha256 of these files as the VM has them (a missing one is left out)."""
        if not paths:
            return {}
        return dict(self._request({"op": "hash", "paths": list(paths)}, "hashing")["hashes"])

    def apply(self, local_root: Path, batch: Batch,
              on_bytes: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Move, write (atomically, with their mtimes), adopt and delete; the receiver's report."""
        request = {"op": "apply", "root": self.root, "source": self.source,
                   "mtimes": {file.path: file.mtime_ns for file in batch.files},
                   "moves": [list(move) for move in batch.moves],
                   "delete": list(batch.deletes), "adopt": {p: list(v) for p, v in batch.adopt.items()}}
        with self._lock:
            channel, lines = self._session()
            try:
                channel.sendall(json_line(request))
                writer = FrameWriter(channel, self.pacer, lambda block: self._ack(lines, block=block), on_bytes)
                hashes = send_tar(writer, local_root, batch.files)
                channel.sendall(json_line({"hashes": hashes}))
                event = self._reply(lines)
                event["hashes"] = hashes
                return event
            except _CUT as error:
                raise self._cut("syncing", error) from None

    def fetch(self, local_root: Path, targets: dict[str, str]) -> list[LocalFile]:
        """Copy remote paths to local ones (remote -> local relative path), each renamed into place whole."""
        fetched = []
        request = {"op": "pack", "root": self.root, "paths": sorted(targets)}
        try:
            channel = start_receiver(self.chain, self.python_argv, request, window_bytes=PULL_WINDOW_BYTES,
                                     timeout_seconds=self.timeout_seconds)
        except _CUT as error:
            raise self._cut("fetching outputs", error, reset=False) from None
        try:
            channel.shutdown_write()
            with tarfile.open(fileobj=channel.makefile("rb"), mode="r|") as archive:
                for member in archive:
                    if member.isfile() and member.name in targets:
                        fetched.append(_receive(archive, member, local_root, targets[member.name]))
        except _CUT as error:
            raise self._cut("fetching outputs", error, reset=False) from None
        finally:
            channel.close()
        return fetched

    def close(self) -> None:
        """End the receiver (it exits at the end of its input); safe to call twice."""
        with self._lock:
            self._reset()

    def _request(self, request: dict[str, Any], doing: str) -> dict[str, Any]:
        with self._lock:
            channel, lines = self._session()
            try:
                channel.sendall(json_line({**request, "root": self.root}))
                event = self._reply(lines)
            except _CUT as error:
                raise self._cut(doing, error) from None
        if event.get("event") == "error":
            raise self._cut(doing, RuntimeError(event.get("text")))
        return event

    def _session(self) -> tuple[Any, _Lines]:
        if self._channel is not None and not self._channel.closed and self.chain.is_active():
            assert self._lines is not None
            return self._channel, self._lines
        self._reset()
        try:
            first = {"op": "list", "root": self.root, "under": [], "source": self.source}  # answers when it is up
            channel = start_receiver(self.chain, self.python_argv, first, timeout_seconds=self.timeout_seconds)
        except _CUT as error:
            raise self._cut("starting the VM's sync receiver", error) from None
        # Not waited for: the first request follows at once, and this reply is skipped when it arrives.
        self._channel, self._lines, self.pacer, self._unanswered = channel, _Lines(channel), AckPacer(), 1
        return channel, self._lines

    def _reply(self, lines: _Lines) -> dict[str, Any]:
        """The answer to the latest request: acks go to the pacer, the session's first answer is skipped."""
        while True:
            event = lines.next()
            if event.get("event") == "ack":
                self.pacer.on_ack(int(event["bytes"]))
            elif self._unanswered:
                self._unanswered -= 1
            else:
                return event

    def _ack(self, lines: _Lines, *, block: bool) -> None:
        while (event := lines.poll(block=block)) is not None:
            if event.get("event") == "ack":
                self.pacer.on_ack(int(event["bytes"]))
            elif self._unanswered:
                self._unanswered -= 1  # the session's first answer; an apply's own answer comes after its frames
                continue
            block = False

    def _cut(self, doing: str, error: BaseException, *, reset: bool = True) -> LinkDown:
        if reset:
            self._reset()
        why = str(error) or type(error).__name__  # a timeout says nothing by itself
        return LinkDown(VM, self.chain.vm_label, f"{doing} ({self.root}) was cut: {why}",
                        "it is retried at the next pass, once the link is back")

    def _reset(self) -> None:
        channel, self._channel, self._lines = self._channel, None, None
        if channel is not None:
            channel.close()


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
