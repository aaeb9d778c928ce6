"""Checkpoints as plain ``.npz`` files: named arrays plus JSON metadata, never pickle, written atomically.

The file is an ordinary NumPy ``.npz`` (a zip of ``.npy`` members, stored uncompressed). The metadata
(step, epoch, config, RNG state, ...) is JSON, UTF-8 encoded in a uint8 array under ``"__meta__"``,
so ``np.load(path, allow_pickle=False)`` opens the whole file. Keys may contain ``/`` and ``.``
(``"model/encoder.0.weight"``, ``"optim/exp_avg"``).

Saving is atomic: the file is written to a temporary file in the target's directory, flushed and
fsynced, then renamed over the target with :func:`os.replace`, and the directory is fsynced. A
crash or an exception at any moment leaves either the previous checkpoint or the new one at the
path, never a partial file; a process killed mid-save can leave a stray ``.<name>.<random>.tmp``
beside it, which nothing reads and the next save ignores.

Loading raises :class:`CheckpointError` for anything a damaged file can get wrong. Every member is
read to its end, so its zip CRC-32 is verified before it is parsed, and each ``.npy`` header must
account for exactly the bytes its member holds. (``np.load`` stops at the end of the array data, so
it can return a damaged header's smaller array without the CRC ever being checked.)
"""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import numpy as np

FORMAT_VERSION = 1
META_KEY = "__meta__"

# What zipfile and NumPy's .npy header parser raise on damaged input. Random damage to a member
# stops at its CRC-32 (BadZipFile); the rest covers zip structures and crafted headers.
_DAMAGE = (
    zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, TypeError, KeyError,
    NotImplementedError, RuntimeError, OverflowError, struct.error, zlib.error, tokenize.TokenError,
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, or does not match what it should hold."""


# ----------------------------------------------------------------------------- saving


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):  # a NumPy scalar, e.g. a float32 loss
        return obj.item()
    if isinstance(obj, np.ndarray):
        raise TypeError(f"a {obj.dtype} array of shape {obj.shape} belongs in `arrays`, not in `meta`")
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _meta_bytes(meta: Mapping[str, Any]) -> np.ndarray:
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"expected meta to be a dict, got {type(meta).__name__}")
    version = meta.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"meta['format_version'] is set by save_checkpoint (it writes {FORMAT_VERSION}), got {version!r}"
        )
    try:
        text = json.dumps({**meta, "format_version": FORMAT_VERSION}, default=_json_default)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"meta is not JSON-serialisable: {e}") from None
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _checked_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping):
        raise CheckpointError(f"expected arrays to be a dict of name -> array, got {type(arrays).__name__}")
    out = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"array names must be non-empty strings, got {name!r}")
        if name == META_KEY:
            raise CheckpointError(f"the array name {META_KEY!r} is reserved for the metadata")
        try:
            a = np.asarray(value)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"array {name!r} cannot be made an array: {e}") from None
        if a.dtype.hasobject:
            raise CheckpointError(
                f"array {name!r} has dtype {a.dtype}: object arrays would need pickle; store numbers, or put "
                "small structured values in `meta`"
            )
        out[name] = a
    return out


def _write_npz(f, arrays: Mapping[str, np.ndarray]) -> None:
    # What np.savez does, minus its keyword arguments: np.savez(f, **arrays) breaks on an array named
    # "file" or "allow_pickle".
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            with zf.open(name + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, a, allow_pickle=False)


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new file beside ``path``, created exclusively; mode 0o666 lets the umask decide permissions."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def fsync_directory(directory: Path) -> None:
    """Make the rename durable. Skipped where directories cannot be opened or fsynced (Windows, some filesystems)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Write ``arrays`` and ``meta`` to ``path`` as one ``.npz``, atomically.

    Parameters
    ----------
    path : str or PathLike
        Target file, written as given (no suffix is added). Its directory must exist.
    arrays : dict of str -> ndarray
        Any shapes and non-object dtypes. Names may contain ``/`` and ``.``; ``"__meta__"`` is reserved.
    meta : dict
        JSON-serialisable metadata (NumPy scalars are converted; tuples come back as lists).
        ``"format_version"`` is added.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    CheckpointError
        For an object array, a reserved or non-string name, or metadata JSON cannot hold; raised
        before anything is written.
    FileNotFoundError
        When the directory does not exist.
    """
    path = Path(path)
    payload = _checked_arrays(arrays)
    payload[META_KEY] = _meta_bytes(meta)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save {path}: directory {path.parent} does not exist")
    return atomic_write(path, lambda f: _write_npz(f, payload))


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], durable: bool = True) -> Path:
    """Write a file so that ``path`` holds either its old contents or all of the new ones, never a part.

    ``write(f)`` fills a binary file object: a temporary file beside ``path``, renamed over it with
    :func:`os.replace` once complete (and, when ``durable``, fsynced with its directory). Used for
    checkpoints and every picture npvae writes.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)
    return path


# ----------------------------------------------------------------------------- reading what a user names
#
# A FIFO blocks its reader until someone writes; /dev/zero never ends; a folder or a socket is no file. So
# every reader (data files, checkpoints, --config, logs, images) stats the path first and refuses anything
# but a regular file, opens it without blocking (O_NONBLOCK: a FIFO swapped in after the stat cannot hang
# the open), checks the open file again with fstat, and reads at most the size fstat reported. JSON's
# RecursionError (100,000 nested brackets) becomes the same one line as any other bad JSON.


def kind_of(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words."""
    for test, words in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def open_regular(path, error: type[Exception] = ValueError, what: str = "file",
                 missing_as_error: bool = True) -> BinaryIO:
    """``path`` opened for binary reading, refused (as ``error``, one line) unless it is a regular file.

    Parameters
    ----------
    path : str or PathLike
    error : exception class
        What to raise: the caller's own (``CheckpointError``, ``DataFileError``, ...).
    what : str
        Names the file's role in the message (``"checkpoint"``, ``"--config"``).
    missing_as_error : bool
        False lets a missing file raise FileNotFoundError as :func:`open` would.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"cannot read {what} {path}: it is {kind_of(mode)}, not a regular file; pass a file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                     | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        if not missing_as_error:
            raise
        raise error(f"{what} {path}: No such file or directory") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced between the stat and the open
            raise error(f"cannot read {what} {path}: it is {kind_of(mode)}, not a regular file; pass a file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path, error: type[Exception] = ValueError, what: str = "file") -> bytes:
    """The whole of a regular file, at most the size it had when opened."""
    with open_regular(path, error, what) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            return f.read(size)
        except OSError as exc:
            raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_text(path, error: type[Exception] = ValueError, what: str = "file") -> str:
    """A regular file as UTF-8 text (bounded as :func:`read_bytes`)."""
    data = read_bytes(path, error, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def parse_json(text: str, error: type[Exception] = ValueError, what: str = "file") -> Any:
    """``json.loads`` with every way hostile text can fail as one ``error`` line naming ``what``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what}: not valid JSON ({exc})") from None
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply to read") from None


def printable(text: str) -> str:
    """``text`` with every control character (an ANSI escape's ESC, a carriage return, ...) written as its
    escape sequence: strings from a file are shown, never obeyed by the terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinity (which JSON cannot hold) replaced by null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


# ----------------------------------------------------------------------------- loading


# Deflate cannot expand data more than ~1032-fold: a member that claims more is crafted, and refusing it
# before allocating keeps memory bounded by the bytes the file really holds.
_MAX_DEFLATE_RATIO = 1100


def read_npy(stream, size: int, name: str, compressed_size: int | None = None) -> np.ndarray:
    """One ``.npy`` array from ``stream``, which holds ``size`` bytes (header included).

    The header's shape and dtype must account for exactly those bytes, checked before the array is
    allocated, so a crafted header cannot make npvae allocate more than the file holds; for a deflated
    zip member (``compressed_size`` given) the size itself may not exceed what deflate can expand its
    compressed bytes to. The stream is read to its end (a zip member's CRC-32 is checked there).

    Raises
    ------
    CheckpointError
        Naming the array: an unsupported header, an object dtype (it would need pickle), sizes that
        disagree, a stream that ends early.
    """
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise CheckpointError(f"array {name!r}: unsupported .npy format version {version}")
    if dtype.hasobject:
        raise CheckpointError(f"array {name!r} is an object array (dtype=object), which npvae never loads "
                              "(it would need pickle)")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    declared = size - stream.tell()
    if nbytes != declared:
        raise CheckpointError(
            f"array {name!r}: header says shape {shape} of {dtype} ({nbytes} bytes), the file holds "
            f"{declared} bytes")
    if compressed_size is not None and size > _MAX_DEFLATE_RATIO * max(compressed_size, 1):
        raise CheckpointError(f"array {name!r}: claims {size} bytes from {compressed_size} compressed "
                              "bytes, more than compression can give")
    out = np.empty(count, dtype=dtype)
    view = memoryview(out.view(np.uint8).reshape(-1)) if nbytes else memoryview(bytearray())
    filled = 0
    while filled < nbytes:
        n = stream.readinto(view[filled:filled + (1 << 24)])
        if not n:
            raise CheckpointError(f"array {name!r}: ends after {filled} of {nbytes} bytes")
        filled += n
    if stream.read(1):  # the end of the member: zipfile checks the CRC-32 here
        raise CheckpointError(f"array {name!r}: more bytes than its header accounts for")
    return out.reshape(shape, order="F" if fortran_order else "C")


def npz_names(zf: zipfile.ZipFile, wanted: Callable[[str], bool] | None = None) -> list[zipfile.ZipInfo]:
    """The members of an ``.npz``, checked from the zip directory alone, before any is read.

    Each must be a ``.npy`` that ``wanted`` (when given) accepts, neither encrypted nor compressed
    other than by deflate: a member nobody reads is never inflated.
    """
    infos = zf.infolist()
    for info in infos:
        if not info.filename.endswith(".npy"):
            raise CheckpointError(f"unexpected member {info.filename!r}: not an .npz of arrays")
        name = info.filename[: -len(".npy")]
        if wanted is not None and name != META_KEY and not wanted(name):
            raise CheckpointError(f"unexpected member {name!r}: not an array this file should hold")
        if info.flag_bits & 0x1:
            raise CheckpointError(f"member {name!r} is encrypted; npvae reads plain .npz files")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(f"member {name!r} uses zip compression method {info.compress_type}; expected "
                                  "stored or deflated members (save with np.savez or np.savez_compressed)")
    return infos


def read_npz_members(f, wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` for each ``.npy`` member of an ``.npz`` (zip) file, each read by :func:`read_npy`
    after all were checked by :func:`npz_names`."""
    with zipfile.ZipFile(f) as zf:
        for info in npz_names(zf, wanted):
            name = info.filename[: -len(".npy")]
            with zf.open(info) as member:
                compressed = None if info.compress_type == zipfile.ZIP_STORED else info.compress_size
                yield name, read_npy(member, info.file_size, name, compressed)


def _read_npz(f, wanted) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name, array in read_npz_members(f, wanted):
        if name in arrays:
            raise CheckpointError(f"array {name!r} appears twice")
        arrays[name] = array
    return arrays


def _parse_meta(raw: np.ndarray) -> dict:
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{META_KEY} must be a 1-D uint8 array of JSON, got {raw.dtype} {raw.shape}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{META_KEY} is not valid UTF-8 JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{META_KEY} nests deeper than JSON metadata can") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{META_KEY} must hold a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if type(version) is not int:
        raise CheckpointError(f"{META_KEY} has no integer format_version (got {version!r})")
    if version != FORMAT_VERSION:
        newer = " (written by a newer npvae?)" if version > FORMAT_VERSION else ""
        raise CheckpointError(f"format_version {version}{newer}: this npvae reads version {FORMAT_VERSION}")
    return meta


def npvae_member(name: str) -> bool:
    """Whether ``name`` is an array npvae's models and trainer store (``model/...``, ``optim/...``)."""
    return name.startswith(MEMBER_PREFIXES)


MEMBER_PREFIXES = ("model/", "optim/")


def load_checkpoint(path: str | os.PathLike,
                    wanted: Callable[[str], bool] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : str or PathLike
        The ``.npz`` file: a regular file (a FIFO or a device is refused before it is opened).
    wanted : callable, optional
        Which array names the file may hold (e.g. :func:`npvae_member`); any other member is refused
        from the zip directory, before it is read. Default: any name.

    Returns
    -------
    arrays : dict of str -> ndarray
        Every array, writeable, with its saved shape and dtype.
    meta : dict
        The metadata, including ``"format_version"``.

    Raises
    ------
    CheckpointError
        When the file is missing, unreadable or not a regular file, not a zip/npz, holds a member
        ``wanted`` refuses, an encrypted member or one compressed other than by deflate, truncated
        or corrupt (CRC or header
        mismatch), lacks ``"__meta__"``, holds bad JSON, an unknown ``format_version``, or an
        object (pickled) array.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"no checkpoint at {path}")
    with open_regular(path, CheckpointError, "checkpoint") as f:
        try:
            arrays = _read_npz(f, wanted)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except _DAMAGE as e:
            raise CheckpointError(f"{path} is not a readable .npz checkpoint (truncated or corrupt?): "
                                  f"{type(e).__name__}: {e}") from e
    raw = arrays.pop(META_KEY, None)
    if raw is None:
        raise CheckpointError(f"{path} has no {META_KEY!r} entry: not an npvae checkpoint")
    try:
        meta = _parse_meta(raw)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return arrays, meta


def check_arrays(
    arrays: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[tuple[int, ...], Any]],
    what: str = "checkpoint",
) -> None:
    """Check that ``arrays`` holds exactly the ``expected`` names, shapes and (where given) dtypes.

    Parameters
    ----------
    arrays : dict of str -> ndarray
        What was loaded.
    expected : dict of str -> (shape, dtype or None)
        What the model or optimizer needs; dtype ``None`` accepts any.
    what : str
        Names the source in the message (``"checkpoint"``, ``"optimizer state"``).

    Raises
    ------
    CheckpointError
        Naming every missing key, every unexpected key and every mismatch, one per line, e.g.
        ``encoder.0.weight: expected (400, 784), got (256, 784)``.
    """
    problems = []
    missing = [name for name in expected if name not in arrays]
    unexpected = [name for name in arrays if name not in expected]
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    for name, (shape, dtype) in expected.items():
        if name not in arrays:
            continue
        a = arrays[name]
        if tuple(a.shape) != tuple(shape):
            problems.append(f"{name}: expected {tuple(shape)}, got {tuple(a.shape)}")
        if dtype is not None and a.dtype != np.dtype(dtype):
            problems.append(f"{name}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    if problems:
        raise CheckpointError(f"{what} does not match:\n  " + "\n  ".join(problems))
