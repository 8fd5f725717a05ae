"""Check encoded images before they reach DALI's decoder.

A DALI decoder that meets a broken file does not skip it: the whole pipeline fails, and stays failed.
So every file is inspected in the external source first, cheaply, from its bytes:

* JPEG: marker walk up to the first scan (a frame header with sane size, precision 8, 1/3/4
  components, not lossless), and an end-of-image marker near the end: a file cut short anywhere
  (even by a few bytes) has none.
* PNG: signature, IHDR size, and the IEND chunk at the end.
* Anything else PIL can read (BMP, GIF, TIFF, WebP, PPM...): decoded with PIL and handed to DALI as a
  lossless BMP, so formats DALI cannot decode (GIF) still work and PIL's RGB conversion is used.

:func:`inspect_encoded` returns ``(data, width, height)`` or raises ``CorruptImageError(path, reason)``.
What still slips through (corrupt entropy-coded data) is caught by the loader, which finds the file
and rebuilds the pipeline without it.
"""
from __future__ import annotations

import io
import os
import stat
import struct
from typing import Tuple

import numpy as np

from ..datasets import CorruptImageError

# Same ceiling as PIL's decompression-bomb error (2x Image.MAX_IMAGE_PIXELS).
MAX_PIXELS = 2 * 89_478_485
# How far from the end the JPEG end-of-image marker may sit (some writers append padding/metadata).
EOI_SEARCH = 1 << 16

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
# Start-of-frame markers: baseline/extended/progressive Huffman and arithmetic; lossless ones excluded.
_SOF_LOSSY = {0xC0, 0xC1, 0xC2, 0xC9, 0xCA}
_SOF_UNSUPPORTED = {0xC3: "lossless", 0xC5: "hierarchical", 0xC6: "hierarchical", 0xC7: "lossless",
                    0xCB: "lossless", 0xCD: "hierarchical", 0xCE: "hierarchical", 0xCF: "lossless"}  # fmt: skip
_STANDALONE = {0x01} | set(range(0xD0, 0xD8))


def _check_size(path: str, width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise CorruptImageError(path, f"image size {width}x{height} is empty")
    if width * height > MAX_PIXELS:
        raise CorruptImageError(path, f"image size {width}x{height} exceeds {MAX_PIXELS} pixels (decompression bomb)")


def jpeg_size(data: bytes, path: str = "<bytes>") -> Tuple[int, int]:
    """(width, height) of a JPEG after checking its structure; CorruptImageError if broken."""
    n = len(data)
    i = 2
    size = None
    while True:
        # Markers are 0xFF followed by a code; 0xFF fill bytes may repeat.
        if i >= n or data[i] != 0xFF:
            raise CorruptImageError(path, f"JPEG: expected a marker at byte {i} (truncated or corrupt header)")
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            raise CorruptImageError(path, "JPEG: truncated inside the header")
        marker = data[i]
        i += 1
        if marker in _STANDALONE:
            continue
        if marker == 0xD9:
            raise CorruptImageError(path, "JPEG: end-of-image marker before any scan")
        if i + 2 > n:
            raise CorruptImageError(path, "JPEG: truncated inside the header")
        (length,) = struct.unpack_from(">H", data, i)
        if length < 2 or i + length > n:
            raise CorruptImageError(path, f"JPEG: segment 0x{marker:02X} of length {length} runs past the end of the file")
        if marker in _SOF_UNSUPPORTED:
            raise CorruptImageError(path, f"JPEG: {_SOF_UNSUPPORTED[marker]} JPEG (SOF 0x{marker:02X}) is not supported")
        if marker in _SOF_LOSSY:
            if length < 8:
                raise CorruptImageError(path, "JPEG: frame header too short")
            precision, height, width, ncomp = struct.unpack_from(">BHHB", data, i + 2)
            if precision != 8:
                raise CorruptImageError(path, f"JPEG: {precision}-bit samples are not supported")
            if ncomp not in (1, 3, 4):
                raise CorruptImageError(path, f"JPEG: {ncomp} colour components are not supported")
            size = (width, height)
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            if size is None:
                raise CorruptImageError(path, "JPEG: scan before any frame header")
            scan_start = i + length
            break
        i += length
    _check_size(path, *size)
    tail_from = max(scan_start, n - EOI_SEARCH)
    if data.rfind(b"\xff\xd9", tail_from) < 0:
        raise CorruptImageError(path, "JPEG: no end-of-image marker (file truncated)")
    return size


def png_size(data: bytes, path: str = "<bytes>") -> Tuple[int, int]:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise CorruptImageError(path, "PNG: missing IHDR header (truncated or corrupt)")
    width, height = struct.unpack_from(">II", data, 16)
    _check_size(path, width, height)
    if data.rfind(_PNG_IEND, max(0, len(data) - 64)) < 0:
        raise CorruptImageError(path, "PNG: no IEND chunk at the end (file truncated)")
    return width, height


def transcode_with_pil(data: bytes, path: str = "<bytes>") -> Tuple[np.ndarray, int, int]:
    """Decode any PIL-readable image fully and re-encode it as an uncompressed BMP for DALI."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_size(path, *img.size)
            img.load()
            rgb = img.convert("RGB")
    except CorruptImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise CorruptImageError(path, f"refused by PIL's decompression-bomb check ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise CorruptImageError(path, f"{type(exc).__name__}: {exc}") from None
    out = io.BytesIO()
    rgb.save(out, "BMP")
    return np.frombuffer(out.getvalue(), dtype=np.uint8), rgb.width, rgb.height


def inspect_encoded(data: bytes, path: str = "<bytes>") -> Tuple[np.ndarray, int, int]:
    """(bytes for DALI as a uint8 array, width, height); CorruptImageError when unusable."""
    if len(data) == 0:
        raise CorruptImageError(path, "file is empty (0 bytes)")
    if data[:2] == b"\xff\xd8":
        w, h = jpeg_size(data, path)
    elif data[:8] == _PNG_SIGNATURE:
        w, h = png_size(data, path)
    else:
        return transcode_with_pil(data, path)
    return np.frombuffer(data, dtype=np.uint8), w, h


def read_and_inspect(path: str) -> Tuple[np.ndarray, int, int]:
    """Read `path` and inspect it; missing or unreadable files become CorruptImageError too."""
    try:
        # A FIFO or device named like an image would block the reader forever: regular files only.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise CorruptImageError(path, "not a regular file")
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise CorruptImageError(path, "file does not exist") from None
    except OSError as exc:
        raise CorruptImageError(path, f"cannot read: {exc}") from None
    return inspect_encoded(data, path)
