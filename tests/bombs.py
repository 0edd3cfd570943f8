"""Decompression bombs: small files whose header claims a huge canvas.

`png_bomb` is a complete, valid PNG (13000 x 13000 RGB, all black: ~0.5 MB on disk, 507 MB
as pixels, the size issue 14 measured at 4.1 GiB in the embedder). `jpeg_bomb` is a real
JPEG whose frame header claims 60000 x 60000 pixels (3.6 G).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(path: Path, side: int = 13000) -> Path:
    # All rows are zeros, so one compressed block of rows (flushed to a byte boundary,
    # history reset) repeated is a valid deflate stream: built in milliseconds, not seconds.
    row = b"\0" * (1 + 3 * side)  # filter byte + RGB
    rows = 64
    block = zlib.compressobj(9, wbits=-15)
    repeated = block.compress(row * rows) + block.flush(zlib.Z_FULL_FLUSH)
    last = zlib.compressobj(9, wbits=-15)
    tail = last.compress(row * (side % rows)) + last.flush()
    checksum = 1
    for _ in range(side // rows):
        checksum = zlib.adler32(row * rows, checksum)
    checksum = zlib.adler32(row * (side % rows), checksum)
    stream = b"\x78\xda" + repeated * (side // rows) + tail + struct.pack(">I", checksum)
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
                     + _chunk(b"IDAT", stream) + _chunk(b"IEND", b""))
    return path


def jpeg_bomb(path: Path, side: int = 60000) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    path.write_bytes(bytes(data))
    return path


def peak_rss_growth(action) -> int:
    """Bytes the process' peak resident memory grew while `action` ran (Linux: the peak is
    reset through /proc/self/clear_refs first)."""
    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS:")
    action()
    return status("VmHWM:") - before
