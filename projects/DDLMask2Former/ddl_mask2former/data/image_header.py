"""Image sizes from file headers, without decoding pixels (PNG, JPEG, BMP, WebP).

Indexing a 1.2M-image split must not decode images. ``read_image_size`` opens a file, reads
its first few KiB (more only if a JPEG's EXIF block is large) and its last bytes, and
returns the (height, width) the decoded image will have, EXIF orientation included, so it
matches ``image_io.read_image``. It also catches the cheap-to-detect damage: a file that is
not one of the supported formats, a header cut short, and a PNG or JPEG whose end marker is
missing (a truncated download or copy).
"""
import os
import struct

import numpy as np

from .image_io import DDLDataError

__all__ = ["read_image_size", "read_folder_sizes", "SUPPORTED_FORMATS"]

SUPPORTED_FORMATS = ("PNG", "JPEG", "BMP", "WebP")

_HEAD_BYTES = 4096
# End markers may be followed by a little padding; look for them in this many final bytes.
_TAIL_BYTES = 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); not C4/C8/CC.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# EXIF orientations 5-8 rotate by 90 degrees, so the displayed image swaps width and height.
_TRANSPOSING_ORIENTATIONS = frozenset((5, 6, 7, 8))


class _FileBytes:
    """Random access to a file's bytes, served from one head read whenever possible."""

    def __init__(self, fd, size):
        self.fd = fd
        self.size = size
        self.head = os.pread(fd, _HEAD_BYTES, 0)

    def get(self, offset, length):
        end = offset + length
        if end <= len(self.head):
            return self.head[offset:end]
        return os.pread(self.fd, length, offset)

    def tail(self):
        if self.size <= len(self.head):
            return self.head[-_TAIL_BYTES:]
        return os.pread(self.fd, _TAIL_BYTES, max(0, self.size - _TAIL_BYTES))


def read_image_size(path, check_end=True):
    """Return (height, width) of the image at ``path`` as read_image will decode it.

    Raises DDLDataError naming ``path`` for a missing, empty, non-image, unsupported or
    truncated file. ``check_end`` verifies that PNG/JPEG files end with their end marker.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise DDLDataError(path, "file does not exist") from None
    except OSError as exc:
        raise DDLDataError(path, f"cannot open file ({exc.strerror})") from exc
    try:
        try:
            data = _FileBytes(fd, os.fstat(fd).st_size)
        except OSError as exc:
            raise DDLDataError(path, f"cannot read file ({exc.strerror})") from exc
        head = data.head
        if not head:
            raise DDLDataError(path, "empty file (0 bytes), not an image")
        if head.startswith(_PNG_SIGNATURE):
            return _png_size(path, data, check_end)
        if head.startswith(b"\xff\xd8"):
            return _jpeg_size(path, data, check_end)
        if head.startswith(b"BM"):
            return _bmp_size(path, data)
        if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            return _webp_size(path, data)
        raise DDLDataError(
            path, f"not a supported image (first bytes {head[:8]!r}; supported: "
                  f"{', '.join(SUPPORTED_FORMATS)})")
    except struct.error:
        raise DDLDataError(path, f"image header is cut short (file has {data.size} bytes)") from None
    finally:
        os.close(fd)


def _png_fast_size(fd, head, check_end):
    """(height, width) of a plain PNG from its head bytes, or None for anything unusual.

    Covers the common case (no eXIf chunk before the pixel data, end marker present) with
    as little Python as possible; None sends the file through read_image_size instead.
    """
    if head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR" or len(head) < 33:
        return None
    width, height = struct.unpack_from(">II", head, 16)
    offset = 33
    while True:
        if offset + 8 > len(head):
            return None
        (length,) = struct.unpack_from(">I", head, offset)
        chunk_type = head[offset + 4:offset + 8]
        if chunk_type == b"IDAT":
            break
        if chunk_type == b"eXIf":
            return None
        offset += 12 + length
    if check_end:
        if len(head) < _HEAD_BYTES:
            tail = head[-_TAIL_BYTES:]
        else:
            tail = os.pread(fd, _TAIL_BYTES, max(0, os.fstat(fd).st_size - _TAIL_BYTES))
        if b"IEND" not in tail:
            return None
    if width == 0 or height == 0:
        return None
    return height, width


def read_folder_sizes(folder, names, check_end=True, collect_errors=False):
    """(height, width) of every file ``names`` in ``folder`` as an int32 array (N, 2).

    Same results and errors as read_image_size, faster: files are opened relative to the
    folder and plain PNGs take a short path. With ``collect_errors`` an unreadable file does
    not stop the reading: its row is (-1, -1), and ``(sizes, [(name, problem), ...])`` is returned.
    """
    sizes = np.empty((len(names), 2), np.int32)
    errors = []
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        for index, name in enumerate(names):
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=folder_fd)
            except OSError:
                fd = None
            size = None
            if fd is not None:
                try:
                    size = _png_fast_size(fd, os.pread(fd, _HEAD_BYTES, 0), check_end)
                except OSError:
                    size = None
                finally:
                    os.close(fd)
            if size is None:
                # Anything unusual (other formats, EXIF, damage) gets the full reader and its errors.
                try:
                    size = read_image_size(os.path.join(folder, name), check_end)
                except DDLDataError as exc:
                    if not collect_errors:
                        raise
                    errors.append((name, exc.problem))
                    size = (-1, -1)
            sizes[index] = size
    finally:
        os.close(folder_fd)
    return (sizes, errors) if collect_errors else sizes


def _oriented(height, width, orientation):
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return width, height
    return height, width


def _png_size(path, data, check_end):
    if data.get(12, 4) != b"IHDR":
        raise DDLDataError(path, "PNG without an IHDR chunk first (corrupt header)")
    width, height = struct.unpack(">II", data.get(16, 8))
    if width == 0 or height == 0:
        raise DDLDataError(path, f"PNG header gives an empty image ({width}x{height})")
    orientation = 1
    # Walk the chunks before the pixel data for an eXIf orientation (rare, but honoured).
    offset = 8
    while offset + 8 <= data.size:
        length, chunk_type = struct.unpack(">I4s", data.get(offset, 8))
        if chunk_type == b"IDAT":
            break
        if chunk_type == b"eXIf":
            orientation = _exif_orientation(data.get(offset + 8, length))
            break
        offset += 12 + length
    if check_end and b"IEND" not in data.tail():
        raise DDLDataError(path, f"PNG is truncated: no IEND chunk at the end "
                                 f"(file has {data.size} bytes)")
    return _oriented(height, width, orientation)


def _jpeg_size(path, data, check_end):
    offset = 2
    orientation = 1
    while True:
        marker = data.get(offset, 2)
        if len(marker) < 2:
            raise DDLDataError(path, "JPEG ends before its frame header (truncated)")
        if marker[0] != 0xFF:
            raise DDLDataError(path, f"JPEG marker expected at byte {offset} (corrupt header)")
        kind = marker[1]
        if kind == 0xFF:
            # Fill byte before a marker.
            offset += 1
            continue
        if kind in (0x01,) or 0xD0 <= kind <= 0xD8:
            # Stand-alone markers carry no length.
            offset += 2
            continue
        (length,) = struct.unpack(">H", data.get(offset + 2, 2))
        if kind in _JPEG_SOF:
            height, width = struct.unpack(">HH", data.get(offset + 5, 4))
            break
        if kind == 0xE1 and orientation == 1:
            segment = data.get(offset + 4, length - 2)
            if segment.startswith(b"Exif\x00\x00"):
                orientation = _exif_orientation(segment[6:])
        if kind == 0xDA:
            raise DDLDataError(path, "JPEG has scan data before any frame header (corrupt)")
        offset += 2 + length
    if width == 0 or height == 0:
        raise DDLDataError(path, f"JPEG frame header gives an empty image ({width}x{height})")
    if check_end and b"\xff\xd9" not in data.tail():
        raise DDLDataError(path, f"JPEG is truncated: no end-of-image marker at the end "
                                 f"(file has {data.size} bytes)")
    return _oriented(height, width, orientation)


def _bmp_size(path, data):
    (header_size,) = struct.unpack("<I", data.get(14, 4))
    if header_size == 12:
        width, height = struct.unpack("<HH", data.get(18, 4))
    else:
        width, height = struct.unpack("<ii", data.get(18, 8))
    height = abs(height)  # negative height means rows stored top-down
    if width <= 0 or height == 0:
        raise DDLDataError(path, f"BMP header gives an empty image ({width}x{height})")
    return height, width


def _webp_size(path, data):
    chunk = data.get(12, 4)
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data.get(26, 4))
        width, height = width & 0x3FFF, height & 0x3FFF
    elif chunk == b"VP8L":
        b = data.get(21, 4)
        bits = int.from_bytes(b, "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8X":
        b = data.get(24, 6)
        if len(b) < 6:
            raise struct.error("short WebP header")
        width = int.from_bytes(b[0:3], "little") + 1
        height = int.from_bytes(b[3:6], "little") + 1
        if data.get(20, 1)[0] & 0x08:
            # The EXIF flag is set: Pillow applies that orientation, so honour it too.
            return _oriented(height, width, _webp_exif_orientation(data))
    else:
        raise DDLDataError(path, f"WebP with unknown chunk {chunk!r}")
    return height, width


def _webp_exif_orientation(data):
    offset = 12
    while offset + 8 <= data.size:
        chunk_type, length = struct.unpack("<4sI", data.get(offset, 8))
        if chunk_type == b"EXIF":
            block = data.get(offset + 8, length)
            if block.startswith(b"Exif\x00\x00"):
                block = block[6:]
            return _exif_orientation(block)
        offset += 8 + length + (length & 1)
    return 1


def _exif_orientation(tiff):
    """Orientation tag (0x0112) of an EXIF/TIFF block, 1 if absent or unreadable."""
    if len(tiff) < 8:
        return 1
    if tiff[:2] == b"II":
        endian = "<"
    elif tiff[:2] == b"MM":
        endian = ">"
    else:
        return 1
    (ifd_offset,) = struct.unpack(endian + "I", tiff[4:8])
    if ifd_offset + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(endian + "H", tiff[ifd_offset:ifd_offset + 2])
    for index in range(count):
        entry = ifd_offset + 2 + 12 * index
        if entry + 12 > len(tiff):
            break
        tag, field_type = struct.unpack(endian + "HH", tiff[entry:entry + 4])
        if tag == 0x0112:
            if field_type == 3:  # SHORT
                (value,) = struct.unpack(endian + "H", tiff[entry + 8:entry + 10])
            else:
                (value,) = struct.unpack(endian + "I", tiff[entry + 8:entry + 12])
            return value if 1 <= value <= 8 else 1
    return 1
