"""IDX files (the MNIST / Fashion-MNIST format), read defensively.

:func:`read_idx` reads an IDX file, gzipped or not: every header field is checked against the
bytes actually present, and a corrupt header can never trigger a huge allocation. NumPy and the
standard library only.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from ..checkpoint import open_regular

__all__ = ["IDXFormatError", "IDX_DTYPES", "MAX_IDX_BYTES", "read_idx"]


class IDXFormatError(ValueError):
    """A file is not a well-formed IDX file (or a gzip of one); the message names file and problem."""


# IDX type codes (http://yann.lecun.com/exdb/mnist/): multi-byte types are big-endian.
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_IDX_BYTES = 2 * 1024**3  # no MNIST-like file comes near; a larger header is taken as corrupt
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


def _describe(shape: tuple[int, ...], dtype: np.dtype) -> str:
    return f"{'x'.join(map(str, shape))} {dtype.newbyteorder('=').name}"


def _parse_header(read, name: str, where: str) -> tuple[bytes, np.dtype, tuple[int, ...], int]:
    """Read and check an IDX header through ``read(n)``.

    Returns the header bytes, the (file byte order) dtype, the shape and the payload size in bytes.
    ``where`` names the byte stream in messages ("file" or "decompressed data").
    """
    magic = read(4)
    if len(magic) < 4:
        raise IDXFormatError(f"{name}: {where} too short for an IDX header ({len(magic)} bytes, need at least 4)")
    if magic[0] != 0 or magic[1] != 0:
        what = "neither a gzip file nor an IDX file" if where == "file" else "decompressed data is not IDX"
        raise IDXFormatError(
            f"{name}: {what}: an IDX file starts with 00 00 <dtype code> <ndim>, got {magic.hex(' ')}")
    code, ndim = magic[2], magic[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise IDXFormatError(f"{name}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if not 1 <= ndim <= 4:
        raise IDXFormatError(f"{name}: IDX header declares {ndim} dimensions, expected 1 to 4")
    dims_bytes = read(4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise IDXFormatError(
            f"{name}: truncated IDX header: {ndim} dimensions need {4 * ndim} bytes after the magic, "
            f"{where} holds {len(dims_bytes)}")
    shape = struct.unpack(f">{ndim}I", dims_bytes)
    if 0 in shape:
        raise IDXFormatError(f"{name}: IDX header declares shape {shape}; every dimension must be positive")
    dtype = IDX_DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize
    return magic + dims_bytes, dtype, shape, nbytes


def _read_idx(path, max_bytes: int, md5=None) -> np.ndarray:
    """:func:`read_idx`, feeding the decompressed IDX bytes (header and payload) to ``md5`` if given."""
    name = os.fspath(path)
    with open_regular(path, IDXFormatError, "IDX file", missing_as_error=False) as f:
        is_gzip = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        if is_gzip:
            where = "decompressed data"
            try:
                with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                    header, dtype, shape, nbytes = _parse_header(gz.read, name, where)
                    _check_cap(name, shape, dtype, nbytes, max_bytes)
                    # Read at most one byte past the declared payload: bounded memory and time
                    # whatever the stream holds, and the extra byte proves trailing data.
                    buf = bytearray()
                    while len(buf) <= nbytes:
                        chunk = gz.read(min(_CHUNK, nbytes + 1 - len(buf)))
                        if not chunk:
                            break
                        buf += chunk
            except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
                raise IDXFormatError(f"{name}: corrupt gzip data: {exc}") from exc
            held = len(buf)
        else:
            where = "file"
            header, dtype, shape, nbytes = _parse_header(f.read, name, where)
            _check_cap(name, shape, dtype, nbytes, max_bytes)
            held = os.fstat(f.fileno()).st_size - len(header)
            if held == nbytes:
                buf = bytearray(nbytes)
                held = f.readinto(buf)
    if held < nbytes:
        raise IDXFormatError(
            f"{name}: truncated IDX payload: header declares {nbytes} bytes ({_describe(shape, dtype)}), "
            f"{where} holds {held}")
    if held > nbytes:
        extra = f"{held - nbytes}" if where == "file" else "at least 1"
        raise IDXFormatError(
            f"{name}: trailing bytes after the IDX payload: header declares {nbytes} bytes "
            f"({_describe(shape, dtype)}), {where} holds {extra} more")
    if md5 is not None:
        md5.update(header)
        md5.update(buf)
    array = np.frombuffer(buf, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
    return array.reshape(shape)


def _check_cap(name: str, shape, dtype, nbytes: int, max_bytes: int) -> None:
    if nbytes > max_bytes:
        raise IDXFormatError(
            f"{name}: IDX header declares {nbytes} bytes ({_describe(shape, dtype)}), over the "
            f"{max_bytes}-byte limit: the header is probably corrupt (raise max_bytes if it is not)")


def read_idx(path, *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped or not.

    Gzip is detected by its magic bytes ``1f 8b``, not by the file name. The header is validated
    against the data actually present before anything large is allocated, and a gzip stream is
    decompressed incrementally, never past one byte beyond the declared payload.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    max_bytes : int, optional
        Largest payload accepted (default 2 GiB); a header declaring more is taken as corrupt.

    Returns
    -------
    array : np.ndarray
        Shape as declared by the header (1 to 4 dimensions), native byte order, dtype one of
        uint8 (type code 0x08), int8 (0x09), int16 (0x0B), int32 (0x0C), float32 (0x0D),
        float64 (0x0E). MNIST images come out as (N, 28, 28) uint8, labels as (N,) uint8.

    Raises
    ------
    IDXFormatError
        Not gzip and not IDX, corrupt gzip, bad magic or dimensions, a declared size over
        ``max_bytes``, a payload shorter or longer than declared. The message names the file.
    OSError
        The file cannot be opened or read.
    """
    return _read_idx(path, max_bytes)

