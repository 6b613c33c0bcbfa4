"""The upload side of a batch: one tar stream cut into paced, acknowledged frames, each file hashed as it goes."""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from .ignore import LocalFile
from .pacing import AckPacer

_READ_BYTES = 1 << 20
COMPRESS_BELOW_BYTES_PER_SECOND = 8e6  # zlib at level 1 packs several times faster than this on any laptop
_RAW_AFTER_INCOMPRESSIBLE = 16  # frames sent as they are after one that did not shrink by a tenth


class FrameWriter:
    """What tarfile writes to: frames on the channel, never more in flight than the pacer allows.

    ``acks(block)`` reads the receiver's acks into the pacer (waiting for one when ``block``). Below
    COMPRESS_BELOW_BYTES_PER_SECOND (and before the rate is known) a frame is a piece of one zlib stream: on a slow
    link a tar's headers and padding, and any text, cost time the CPU does not. Data that does not shrink (already
    compressed, random) goes as it is, or the CPU would become the bottleneck.
    """

    def __init__(self, channel: Any, pacer: AckPacer, acks: Callable[[bool], None],
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self._channel = channel
        self._pacer = pacer
        self._acks = acks
        self._on_bytes = on_bytes
        self._buffer = bytearray()
        self._zip = zlib.compressobj(1)
        self._raw_frames = 0

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) >= self._pacer.frame_bytes():
            size = self._pacer.frame_bytes()
            self._frame(bytes(self._buffer[:size]))
            del self._buffer[:size]
        return len(data)

    def finish(self) -> None:
        """Send what is buffered and the end mark (``0\\n``)."""
        if self._buffer:
            self._frame(bytes(self._buffer))
            self._buffer.clear()
        self._channel.sendall(b"0\n")

    def _frame(self, chunk: bytes) -> None:
        self._acks(False)
        if self._raw_frames == 0 and self._pacer.rate_bytes_per_second < COMPRESS_BELOW_BYTES_PER_SECOND:
            packed = self._zip.compress(chunk) + self._zip.flush(zlib.Z_SYNC_FLUSH)
            if len(packed) > 0.9 * len(chunk):
                self._raw_frames = _RAW_AFTER_INCOMPRESSIBLE  # already packed data: spare the CPU for a while
            chunk, header = packed, b"z%d\n" % len(packed)
        else:
            self._raw_frames = max(0, self._raw_frames - 1)
            header = b"%d\n" % len(chunk)
        while self._pacer.in_flight and self._pacer.room() <= 0:  # a frame may overshoot: the link stays full
            self._acks(True)
        self._channel.sendall(header + chunk)
        self._pacer.on_send(len(chunk))
        if self._on_bytes is not None:
            self._on_bytes(len(chunk))


def send_tar(writer: FrameWriter, local_root: Path, files: Sequence[LocalFile]) -> dict[str, str]:
    """Stream each file as it is now, stamped with the mtime the batch recorded; path -> sha256 of what was sent.

    A file that changed since it was scanned still goes whole; its newer mtime makes the next pass send it again.
    """
    hashes: dict[str, str] = {}
    if not files:  # moves, deletes or adoptions only: no archive at all
        writer.finish()
        return hashes
    with tarfile.open(fileobj=cast(Any, writer), mode="w|", format=tarfile.GNU_FORMAT, bufsize=_READ_BYTES) as archive:
        for file in files:
            try:
                with open(local_root / file.path, "rb") as source:
                    size = os.fstat(source.fileno()).st_size
                    member = tarfile.TarInfo(file.path)
                    member.size, member.mode, member.mtime = size, file.mode, file.mtime_ns // 10**9
                    reader = _Exactly(source, size)
                    archive.addfile(member, reader)
                    hashes[file.path] = reader.digest.hexdigest()
            except FileNotFoundError:
                continue  # deleted since the batch was made: its delete event follows
    writer.finish()
    return hashes


def sha256_of(path: Path) -> str | None:
    """The file's sha256, or None when it cannot be read (gone meanwhile)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as source:
            while chunk := source.read(_READ_BYTES):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


class _Exactly:
    """Read exactly ``size`` bytes, hashing them: a file that shrank meanwhile is padded, so the stream stays whole."""

    def __init__(self, source: Any, size: int) -> None:
        self._source = source
        self._left = size
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._source.read(n)
        data += b"\0" * (n - len(data))
        self._left -= n
        self.digest.update(data)
        return data
