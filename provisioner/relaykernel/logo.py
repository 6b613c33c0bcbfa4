"""The kernelspec's launcher-tile logo (laptop, relay, VM joined by a line), drawn as PNG with the standard library."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

SIZES = (32, 64)
_BACKGROUND = (24, 62, 92, 255)
_LINE = (200, 220, 235, 255)
_DOTS = (((0.22, 0.5), (255, 255, 255, 255)), ((0.5, 0.5), (120, 200, 235, 255)), ((0.78, 0.5), (255, 160, 40, 255)))
_CLEAR = (0, 0, 0, 0)


def _pixel(x: float, y: float) -> tuple[int, int, int, int]:
    """The colour at (x, y) in the unit square."""
    corner = 0.18
    dx, dy = max(corner - x, 0, x - (1 - corner)), max(corner - y, 0, y - (1 - corner))
    if dx * dx + dy * dy > corner * corner:
        return _CLEAR
    for (cx, cy), colour in _DOTS:
        if (x - cx) ** 2 + (y - cy) ** 2 <= 0.1**2:
            return colour
    if 0.22 <= x <= 0.78 and abs(y - 0.5) <= 0.03:
        return _LINE
    return _BACKGROUND


def png(size: int) -> bytes:
    """The logo as a ``size``×``size`` RGBA PNG."""
    rows = b"".join(
        b"\0" + b"".join(bytes(_pixel((col + 0.5) / size, (row + 0.5) / size)) for col in range(size))
        for row in range(size)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def write_logos(directory: str | Path) -> None:
    """logo-32x32.png and logo-64x64.png, the names Jupyter's launcher looks for, into a kernelspec directory."""
    for size in SIZES:
        Path(directory, f"logo-{size}x{size}.png").write_bytes(png(size))
