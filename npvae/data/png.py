"""PNG reading and writing with the standard library (zlib, struct) and NumPy.

Reading (:func:`read_png`) is the fallback when Pillow is not installed (:mod:`npvae.data.files`
uses Pillow whenever it can be imported). Writing (:func:`write_png`) is how npvae draws its image
grids when matplotlib is not installed: 8-bit grayscale or RGB, written atomically.

Supported: every non-interlaced PNG of the five colour types and all their bit depths: grayscale
(1, 2, 4, 8, 16 bits), RGB (8, 16), palette (1, 2, 4, 8), grayscale + alpha (8, 16) and RGBA
(8, 16), with all five row filters. Adam7-interlaced files are refused with a clear message.
The output is always ``uint8``, with what Pillow and libpng's ``strip_16`` give:

- grayscale (with or without alpha) -> ``(H, W)``; RGB, RGBA and palette -> ``(H, W, 3)``;
  alpha channels and ``tRNS`` transparency are dropped;
- 16-bit samples keep their high byte (``v >> 8``); 1, 2 and 4-bit gray is scaled to 0..255
  (``v * 255 // (2**depth - 1)``).

Every chunk's CRC is checked, the size in the header is capped and checked against the data
before anything large is allocated, and decompression stops one byte past the declared size.
The decoder's work is bounded before it starts, so a decompression bomb costs one line, not minutes
or gigabytes: the signature is checked before anything else is read; the file is read chunk by
chunk, never past the image data its header can need (:data:`MAX_ANCILLARY_BYTES` of other chunks);
the header may declare at most :data:`MAX_PNG_PIXELS` pixels (Pillow's own bomb limit) and no more
image data than deflate can expand the compressed bytes to; and the decoding buffers must fit
:func:`npvae.memory.check`.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .. import memory
from ..checkpoint import atomic_write, open_regular

__all__ = ["PNGFormatError", "PNG_SIGNATURE", "MAX_PNG_PIXELS", "read_png", "decode_png", "write_png", "encode_png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_PIXELS = 89_478_485  # Pillow's MAX_IMAGE_PIXELS: beyond it Pillow warns of a decompression bomb
MAX_ANCILLARY_BYTES = 1 << 24  # text, ICC profiles and other chunks the decoder skips, all together
_MAX_DEFLATE_RATIO = 1032  # deflate cannot expand its input more than this

# colour type -> (samples per pixel, allowed bit depths, name for messages)
_COLOR_TYPES = {
    0: (1, (1, 2, 4, 8, 16), "grayscale"),
    2: (3, (8, 16), "RGB"),
    3: (1, (1, 2, 4, 8), "palette"),
    4: (2, (8, 16), "grayscale+alpha"),
    6: (4, (8, 16), "RGBA"),
}


class PNGFormatError(ValueError):
    """A file is not a PNG this decoder can read; the message names the file and the problem."""


def read_png(path) -> np.ndarray:
    """Decode a PNG file to ``uint8`` pixels.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    pixels : (H, W) uint8 array for grayscale (alpha dropped), (H, W, 3) uint8 for RGB, RGBA
        (alpha dropped) and palette images.

    Raises
    ------
    PNGFormatError
        Not a PNG, a corrupt or truncated one (bad CRC, bad zlib data, too little or too much
        image data), or an interlaced one. The message names the file.
    OSError
        The file cannot be opened or read.
    """
    with open_regular(path, PNGFormatError, "image") as f:
        return _decode(f, os.fstat(f.fileno()).st_size, os.fspath(path))


def decode_png(blob: bytes, name: str = "<bytes>") -> np.ndarray:
    """:func:`read_png` on bytes in memory; ``name`` labels the messages."""
    return _decode(io.BytesIO(blob), len(blob), name)


def _decode(f, size: int, name: str) -> np.ndarray:
    """Decode the PNG in the binary stream ``f`` of ``size`` bytes."""
    width, height, depth, color, palette, idat = _parse_chunks(f, size, name)
    channels = _COLOR_TYPES[color][0]
    bpp = max(1, channels * depth // 8)            # bytes per complete pixel: the filters' unit
    stride = (width * channels * depth + 7) // 8   # bytes per row, without the filter-type byte
    data = _inflate(idat, height * (1 + stride), name).reshape(height, 1 + stride)
    kinds = data[:, 0]
    if kinds.max() > 4:
        row = int(np.argmax(kinds > 4))
        raise PNGFormatError(f"{name}: row {row} has filter type {kinds[row]}, expected 0 to 4: the file is corrupt")
    rows = (_unfilter_wavefront if kinds.max() >= 3 else _unfilter_rows)(data[:, 1:], kinds, bpp)
    samples = _samples(rows, width, channels, depth)  # (H, W, channels) uint8
    if color == 0:
        out = samples[..., 0]
        if depth < 8:
            out = out * np.uint8(255 // (2**depth - 1))
    elif color == 3:
        index = samples[..., 0]
        if index.max() >= len(palette):
            raise PNGFormatError(f"{name}: pixel uses palette entry {index.max()} but the palette has "
                                 f"{len(palette)} entries: the file is corrupt")
        out = palette[index]
    elif color == 4:
        out = samples[..., 0]
    else:
        out = samples[..., :3]
    return np.ascontiguousarray(out)


def _parse_chunks(f, size: int, name: str):
    """Check signature, chunk lengths, CRCs and the header, reading ``f`` chunk by chunk. Returns (width,
    height, depth, colour type, palette (P, 3) uint8 or None, concatenated IDAT payloads)."""
    signature = f.read(8)
    if signature != PNG_SIGNATURE:
        raise PNGFormatError(f"{name}: not a PNG file (a PNG starts with 89 50 4e 47 0d 0a 1a 0a, "
                             f"got {signature.hex(' ') or 'an empty file'})")
    pos, header, palette, idat = 8, None, None, []
    idat_bytes, other_bytes, most_idat = 0, 0, None
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise PNGFormatError(f"{name}: truncated PNG: the file ends at byte {pos + len(head)} before its IEND "
                                 "chunk")
        length, kind = struct.unpack(">I4s", head)
        end = pos + 12 + length
        if not kind.isalpha() or length > 0x7FFFFFFF:
            raise PNGFormatError(f"{name}: corrupt PNG: no valid chunk at byte {pos} (type {kind!r}, length {length})")
        if end > size:
            raise PNGFormatError(f"{name}: truncated PNG: chunk {kind.decode()} at byte {pos} declares {length} "
                                 f"bytes, the file holds {max(size - pos - 12, 0)}")
        if kind == b"IDAT" and most_idat is not None:
            idat_bytes += length
            if idat_bytes > most_idat:
                raise PNGFormatError(f"{name}: corrupt PNG: more than {most_idat:,} bytes of image data for "
                                     f"{header[0]}x{header[1]} pixels")
        elif kind != b"IDAT":
            other_bytes += length
            if other_bytes > MAX_ANCILLARY_BYTES:
                raise PNGFormatError(f"{name}: more than {MAX_ANCILLARY_BYTES:,} bytes in chunks other than image "
                                     "data; re-save the image without its metadata")
        body, crc = f.read(length), f.read(4)
        if len(body) < length or len(crc) < 4:
            raise PNGFormatError(f"{name}: truncated PNG: chunk {kind.decode()} at byte {pos} ends early")
        if zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise PNGFormatError(f"{name}: corrupt PNG: CRC mismatch in chunk {kind.decode()} at byte {pos}")
        if header is None and kind != b"IHDR":
            raise PNGFormatError(f"{name}: corrupt PNG: the first chunk is {kind.decode()}, expected IHDR")
        if kind == b"IHDR":
            header = _check_header(body, name)
            raw = _raw_bytes(*header)
            # deflate's worst case (stored blocks) adds 5 bytes per 65,535: twice the data is ample
            most_idat = 2 * raw + 1024
            _check_work(header, raw, size, name)
        elif kind == b"PLTE":
            if length % 3 or not 3 <= length <= 768:
                raise PNGFormatError(f"{name}: corrupt PNG: PLTE chunk of {length} bytes, expected 3 to 768 "
                                     f"in steps of 3")
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif kind[0] & 0x20 == 0:  # upper-case first letter: a critical chunk we cannot skip
            raise PNGFormatError(f"{name}: unknown critical PNG chunk {kind.decode()}; cannot decode this file")
        pos = end
    width, height, depth, color = header
    if color == 3 and palette is None:
        raise PNGFormatError(f"{name}: corrupt PNG: palette image without a PLTE chunk")
    if not idat:
        raise PNGFormatError(f"{name}: corrupt PNG: no IDAT chunk (no image data)")
    return width, height, depth, color, palette, b"".join(idat)


def _raw_bytes(width: int, height: int, depth: int, color: int) -> int:
    """Bytes of the inflated image data: each row's filter byte and its samples."""
    return height * (1 + (width * _COLOR_TYPES[color][0] * depth + 7) // 8)


def _check_work(header, raw: int, size: int, name: str) -> None:
    """Refuse, from the header alone, image data deflate cannot produce from the whole file, and decoding
    buffers beyond :func:`npvae.memory.check` (the raw bytes, the Average/Paeth wavefront's two int16
    grids, the pixels)."""
    width, height, depth, color = header
    if raw > _MAX_DEFLATE_RATIO * size + 1024:
        raise PNGFormatError(f"{name}: header declares {width}x{height} pixels ({raw:,} bytes of image data) but "
                             f"the file holds {size:,} bytes, less than deflate needs for them: a decompression "
                             "bomb or a corrupt header")
    channels = _COLOR_TYPES[color][0]
    pixels = width * height
    work = 2 * raw + 4 * 2 * pixels * max(1, channels * depth // 8) + 2 * pixels * channels
    try:
        memory.check(work, f"decoding {width}x{height} {_COLOR_TYPES[color][2]} pixels", "use a smaller image, or "
                     "install Pillow (pip install pillow)", source=name)
    except memory.MemoryRefused as exc:
        raise PNGFormatError(str(exc)) from None


def _check_header(body: bytes, name: str) -> tuple[int, int, int, int]:
    if len(body) != 13:
        raise PNGFormatError(f"{name}: corrupt PNG: IHDR chunk of {len(body)} bytes, expected 13")
    width, height, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
    if not (1 <= width <= 0x7FFFFFFF and 1 <= height <= 0x7FFFFFFF):
        raise PNGFormatError(f"{name}: corrupt PNG: header declares {width}x{height} pixels")
    if width * height > MAX_PNG_PIXELS:
        raise PNGFormatError(f"{name}: header declares {width}x{height} pixels, over the {MAX_PNG_PIXELS:,}-pixel "
                             f"limit (Pillow's): a possible decompression bomb; use smaller images (or tiles)")
    if color not in _COLOR_TYPES:
        raise PNGFormatError(f"{name}: corrupt PNG: unknown colour type {color} (known: 0, 2, 3, 4, 6)")
    if depth not in _COLOR_TYPES[color][1]:
        raise PNGFormatError(f"{name}: corrupt PNG: bit depth {depth} is not allowed for {_COLOR_TYPES[color][2]} "
                             f"images (allowed: {', '.join(map(str, _COLOR_TYPES[color][1]))})")
    if compression != 0 or filtering != 0 or interlace not in (0, 1):
        raise PNGFormatError(f"{name}: corrupt PNG: unknown compression {compression}, filter method {filtering} "
                             f"or interlace method {interlace} (each must be 0; interlace 0 or 1)")
    if interlace == 1:
        raise PNGFormatError(f"{name}: Adam7-interlaced PNGs need Pillow (pip install pillow), or save the "
                             f"image without interlacing")
    return width, height, depth, color


def _inflate(idat: bytes, expected: int, name: str) -> np.ndarray:
    """Decompress at most one byte past ``expected``: bounded memory whatever the stream holds."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(idat, expected + 1)
    except zlib.error as exc:
        raise PNGFormatError(f"{name}: corrupt PNG image data (zlib: {exc})") from None
    if len(raw) != expected:
        more = "more than" if len(raw) > expected else f"{len(raw)} bytes, not"
        raise PNGFormatError(f"{name}: corrupt or truncated PNG: the image data holds {more} the {expected} "
                             f"bytes its header declares")
    return np.frombuffer(raw, np.uint8)


def _unfilter_rows(data: np.ndarray, kinds: np.ndarray, bpp: int) -> np.ndarray:
    """Undo filters 0 (None), 1 (Sub) and 2 (Up), one vectorised step per row.

    Parameters
    ----------
    data : (H, S) uint8, the filtered bytes of each row
    kinds : (H,) filter types, all in {0, 1, 2}
    bpp : bytes per pixel (at least 1); S is a multiple of it

    Returns
    -------
    rows : (H, S) uint8
    """
    out = np.empty_like(data)
    prev = np.zeros(data.shape[1], np.uint8)
    for r, kind in enumerate(kinds):
        row = data[r]
        if kind == 1:  # Sub adds the byte bpp to the left: a running sum per channel, mod 256
            row = np.cumsum(row.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # Up adds the byte above, mod 256
            row = row + prev
        out[r] = row
        prev = out[r]
    return out


def _unfilter_wavefront(data: np.ndarray, kinds: np.ndarray, bpp: int) -> np.ndarray:
    """Undo any mix of the five filters, one anti-diagonal of pixels at a time.

    Average and Paeth make each pixel depend on its left, upper and upper-left neighbours, so a
    row cannot be undone in one vectorised step; but the pixels on one anti-diagonal
    (row + column constant) depend only on earlier anti-diagonals. In a zero-padded
    ``(H + 1, U + 1)`` grid of pixels (U pixels per row) stored row-major, an anti-diagonal is a
    strided slice with step U, and its neighbours are the same slice shifted by -1, -(U + 1)
    and -(U + 2): H + U - 1 vectorised steps, views only.

    Parameters
    ----------
    data : (H, S) uint8, the filtered bytes of each row
    kinds : (H,) filter types in 0..4
    bpp : bytes per pixel (at least 1); S = U * bpp

    Returns
    -------
    rows : (H, S) uint8
    """
    h, stride = data.shape
    u = stride // bpp
    width = u + 1
    grid = np.zeros((h + 1, width, bpp), np.int16)  # row 0 and column 0: the zeros PNG assumes
    raw = np.zeros_like(grid)
    raw[1:, 1:] = data.reshape(h, u, bpp)
    flat, flat_raw = grid.reshape(-1, bpp), raw.reshape(-1, bpp)
    row_kind = np.concatenate([[0], kinds]).astype(np.intp)[:, None]
    for d in range(2, h + u + 1):
        r0, r1 = max(1, d - u), min(h, d - 1)
        start, stop = r0 * width + d - r0, r1 * width + d - r1 + 1
        a = flat[start - 1:stop - 1:u]                  # left
        b = flat[start - width:stop - width:u]          # up
        c = flat[start - width - 1:stop - width - 1:u]  # up-left
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        predictor = np.choose(row_kind[r0:r1 + 1], (0, a, b, (a + b) >> 1, paeth))
        flat[start:stop:u] = (flat_raw[start:stop:u] + predictor) & 0xFF
    return grid[1:, 1:].reshape(h, stride).astype(np.uint8)


def _samples(rows: np.ndarray, width: int, channels: int, depth: int) -> np.ndarray:
    """Unfiltered rows (H, S) uint8 -> samples (H, W, channels) uint8 (16-bit: the high byte)."""
    h = rows.shape[0]
    if depth == 8:
        return rows.reshape(h, width, channels)
    if depth == 16:  # big-endian: the first byte of each sample is v >> 8
        return rows.reshape(h, width, channels, 2)[..., 0]
    bits = np.unpackbits(rows, axis=1).reshape(h, -1, depth)[:, :width]  # (H, W, depth), MSB first
    weights = (1 << np.arange(depth - 1, -1, -1)).astype(np.uint8)
    return (bits * weights).sum(axis=2, dtype=np.uint8)[..., None]


# ----------------------------------------------------------------------------- writing


def encode_png(pixels) -> bytes:
    """8-bit pixels as the bytes of a PNG file: grayscale (colour type 0) or RGB (colour type 2).

    Every row carries the Up filter (its difference from the row above, mod 256), which suits
    image grids, and the image data is one zlib stream (level 9) in one IDAT chunk.

    Parameters
    ----------
    pixels : (H, W) uint8 array (grayscale) or (H, W, 3) uint8 array (RGB)

    Returns
    -------
    bytes
        A PNG that :func:`decode_png` (and any other reader) decodes back to ``pixels``.

    Raises
    ------
    TypeError
        For a dtype other than uint8 (scale floats in [0, 1] with ``np.rint(255 * x).astype(np.uint8)``).
    ValueError
        For any other shape, an empty image, or more than :data:`MAX_PNG_PIXELS` pixels.
    """
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got dtype {arr.dtype} (scale floats in [0, 1] with "
                        "np.rint(255 * x).astype(np.uint8))")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"expected pixels of shape (H, W) (grayscale) or (H, W, 3) (RGB), got {arr.shape}")
    height, width = arr.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"expected an image of at least 1x1 pixels, got {arr.shape}")
    if height * width > MAX_PNG_PIXELS:
        raise ValueError(f"{width}x{height} pixels is over the {MAX_PNG_PIXELS}-pixel limit")
    rows = arr.reshape(height, -1)  # (H, W * channels)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2  # Up
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # wraps mod 256, as the filter defines
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    return b"".join([PNG_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", zlib.compress(filtered.tobytes(), 9)),
                     _chunk(b"IEND", b"")])


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_png(path, pixels) -> Path:
    """Write ``pixels`` ((H, W) or (H, W, 3) uint8, see :func:`encode_png`) to ``path`` atomically:
    the file holds the old picture or the new one, never part of one. Parent folders are created.

    Returns
    -------
    Path
        ``path``.
    """
    blob = encode_png(pixels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: f.write(blob), durable=False)
