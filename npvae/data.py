"""Data: IDX files, MNIST / Fashion-MNIST lookup and download, the shipped demo digits,
preprocessing and seeded batching.

Everything here uses NumPy and the standard library only (downloads go through :mod:`urllib`).

- :func:`read_idx` reads an IDX file (gzipped or not) defensively: every header field is checked
  against the bytes actually present, and a corrupt header can never trigger a huge allocation.
- :func:`load_dataset` is the single entry point for training: ``"mnist"``, ``"fashion-mnist"``,
  ``"demo"``, or ``None`` for "full MNIST if available, else the demo digits".
- Files are looked up (:func:`find_dataset_dir`) in an explicit ``data_dir``, ``$NPVAE_DATA_DIR``,
  the user cache (``$XDG_CACHE_HOME/npvae`` or ``~/.cache/npvae``) and Debian's
  ``/usr/share/datasets/fashion-mnist``; missing files are fetched by :func:`download`.
- Two checksums per file: ``md5`` of the ``.gz`` as the mirrors serve it (checked on download),
  and ``raw_md5`` of the decompressed IDX bytes (checked on load). The second holds for any
  re-compressed copy: Debian's package and the copies in ``shared/data`` are re-gzipped, so their
  ``.gz`` checksums differ from the mirrors' while their contents are identical.
- Images are ``uint8`` arrays of shape ``(N, 784)`` (rows of a 28x28 image), labels ``uint8``
  ``(N,)``; :func:`to_float`, :func:`binarize_static` and :func:`binarize_dynamic` turn them into
  model inputs, :func:`epoch_permutation` and :func:`batch_indices` into reproducible batches.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import socket
import struct
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .checkpoint import fsync_directory

__all__ = [
    "IDXFormatError", "DownloadError", "IDXFile", "DatasetSpec", "DATASETS", "Dataset",
    "read_idx", "cache_dir", "find_dataset_dir", "download", "load_mnist_like", "load_demo",
    "load_dataset", "to_float", "binarize_static", "binarize_dynamic", "epoch_permutation",
    "batch_indices",
]


class IDXFormatError(ValueError):
    """A file is not a well-formed IDX file (or a gzip of one); the message names file and problem."""


class DownloadError(OSError):
    """Every mirror failed to deliver a file with the expected checksum."""


# ----------------------------------------------------------------------------- IDX files

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
    with open(path, "rb") as f:
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


# ----------------------------------------------------------------------------- the datasets


@dataclass(frozen=True)
class IDXFile:
    """One file of an MNIST-like dataset."""

    filename: str          # as the mirrors serve it, e.g. "train-images-idx3-ubyte.gz"
    md5: str               # of the .gz as served (torchvision's table): checked on download
    raw_md5: str           # of the decompressed IDX bytes: checked on load, any compression
    shape: tuple[int, ...]  # e.g. (60000, 28, 28)

    @property
    def raw_filename(self) -> str:
        """The same file uncompressed, e.g. ``train-images-idx3-ubyte``."""
        return self.filename[:-3] if self.filename.endswith(".gz") else self.filename


@dataclass(frozen=True)
class DatasetSpec:
    """Where an MNIST-like dataset comes from and what its files must contain."""

    name: str                  # "mnist" or "fashion-mnist": also the sub-folder name on disk
    title: str                 # for messages, e.g. "Fashion-MNIST"
    mirrors: tuple[str, ...]   # base URLs, tried in order; each ends with "/"
    files: dict[str, IDXFile] = field(repr=False)  # keys: train-images, train-labels, test-images, test-labels


# The .gz md5s are torchvision's; the raw md5s are those of the decompressed files, as published
# for the original releases. Both were checked against shared/data: every raw md5 matches there
# (MNIST t10k images and labels, train labels; all four Fashion-MNIST files), while the .gz md5s
# do not, because those copies were re-compressed (Fashion-MNIST's come from Debian's package).
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        title="MNIST",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        files={
            "train-images": IDXFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                    "6bbc9ace898e44ae57da46a324031adb", (60000, 28, 28)),
            "train-labels": IDXFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432",
                                    "a25bea736e30d166cdddb491f175f624", (60000,)),
            "test-images": IDXFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3",
                                   "2646ac647ad5339dbf082846283269ea", (10000, 28, 28)),
            "test-labels": IDXFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c",
                                   "27ae3e4e09519cfbb04c329615203637", (10000,)),
        },
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        title="Fashion-MNIST",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files={
            "train-images": IDXFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                    "f4a8712d7a061bf5bd6d2ca38dc4d50a", (60000, 28, 28)),
            "train-labels": IDXFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe",
                                    "9018921c3c673c538a1fc5bad174d6f9", (60000,)),
            "test-images": IDXFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79",
                                   "8181f5470baa50b63fa0f6fddb340f0a", (10000, 28, 28)),
            "test-labels": IDXFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310",
                                   "15d484375f8d13e6eb1aabb0c3f46965", (10000,)),
        },
    ),
}
SPLITS = ("train", "test")
# Folders that system packages install (Debian: dataset-fashion-mnist); searched last.
SYSTEM_DATA_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}


def _spec(name: str) -> DatasetSpec:
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    return DATASETS[key]


def _roles(splits) -> list[str]:
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected 'train' or 'test'")
    return [f"{split}-{kind}" for split in splits for kind in ("images", "labels")]


def _md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _raw_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    _read_idx(path, MAX_IDX_BYTES, md5=h)
    return h.hexdigest()


def _locate(folder: Path, spec_file: IDXFile) -> Path | None:
    """The file in ``folder``, gzipped (served name) or not (name without ``.gz``)."""
    for candidate in (folder / spec_file.filename, folder / spec_file.raw_filename):
        if candidate.is_file():
            return candidate
    return None


def _contents_match(path: Path, spec_file: IDXFile) -> bool:
    try:
        return _raw_md5(path) == spec_file.raw_md5
    except (IDXFormatError, OSError):
        return False


def cache_dir() -> Path:
    """The user cache folder: ``$XDG_CACHE_HOME/npvae``, or ``~/.cache/npvae``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "npvae"


def _search_roots(name: str, data_dir) -> list[Path]:
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get("NPVAE_DATA_DIR")
    if env:
        roots.append(Path(env).expanduser())
    roots.append(cache_dir())
    roots.extend(SYSTEM_DATA_DIRS.get(name, ()))
    return roots


def find_dataset_dir(name: str, data_dir=None, splits: str | Sequence[str] = SPLITS,
                     verify: bool = True) -> Path | None:
    """Find a folder that holds the files of ``name`` for ``splits``.

    Roots, in order: ``data_dir``, ``$NPVAE_DATA_DIR``, :func:`cache_dir`, then system folders
    (``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST). In each root the files may sit in a
    sub-folder named after the dataset (``ROOT/mnist/``; tried first) or directly in it, gzipped
    or not. A folder counts only if it holds the images and labels of every requested split and
    (with ``verify``) its label files have the right contents: MNIST and Fashion-MNIST share file
    names, so this is what tells them apart. Image contents are verified on load, not here.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist"}
    data_dir : str or os.PathLike, optional
        Searched first.
    splits : "train", "test" or a sequence of them
        The splits whose files must be present (default: both).
    verify : bool
        Check the label files' contents (cheap: they are small).

    Returns
    -------
    folder : pathlib.Path or None
        None when no root holds a complete set.
    """
    for folder, labels_ok in _candidates(_spec(name), data_dir, _roles(splits), verify):
        if labels_ok:
            return folder
    return None


def _candidates(spec: DatasetSpec, data_dir, roles: list[str], verify: bool) -> Iterator[tuple[Path, bool]]:
    """Folders holding every file of ``roles``, in lookup order, with whether their labels check out."""
    for root in _search_roots(spec.name, data_dir):
        for folder in (root / spec.name, root):
            found = {role: _locate(folder, spec.files[role]) for role in roles}
            if all(found.values()):
                yield folder, not verify or all(
                    _contents_match(found[role], spec.files[role]) for role in roles if role.endswith("labels"))


# ----------------------------------------------------------------------------- download


class _FetchFailed(Exception):
    """One attempt at one URL failed."""

    def __init__(self, message: str, retry: bool, reached: bool):
        super().__init__(message)
        self.retry = retry      # worth another attempt at the same URL (timeouts, resets, 5xx, short reads)
        self.reached = reached  # the server answered, so the machine is online


def _fetch(url: str, target: Path, md5: str, timeout: float, max_bytes: int) -> None:
    """Stream ``url`` to a temporary file beside ``target``; move it into place only if complete
    and its md5 matches. Nothing is left behind on failure."""
    request = urllib.request.Request(url, headers={"User-Agent": "npvae (python urllib)"})
    tmp, answered = None, False
    try:
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise _FetchFailed(f"HTTP {exc.code} {exc.reason}", retry=False, reached=True) from exc
            raise _FetchFailed(f"HTTP {exc.code} {exc.reason}", retry=True, reached=True) from exc
        except urllib.error.URLError as exc:
            # An unknown host name will not resolve on the next attempt either.
            retry = not isinstance(exc.reason, socket.gaierror)
            raise _FetchFailed(f"{exc.reason}", retry=retry, reached=False) from exc
        answered = True
        with response:
            declared = response.headers.get("Content-Length")
            declared = int(declared) if declared and declared.isdigit() else None
            if declared is not None and declared > max_bytes:
                raise _FetchFailed(f"server announces {declared} bytes, more than the {max_bytes} expected at most",
                                   retry=False, reached=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            h = hashlib.md5(usedforsecurity=False)
            received = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := response.read(1 << 16):
                    received += len(chunk)
                    if received > max_bytes:
                        raise _FetchFailed(f"server sent more than {max_bytes} bytes", retry=False, reached=True)
                    h.update(chunk)
                    out.write(chunk)
                # http.client does not flag a body cut short of its Content-Length: check here.
                if declared is not None and received != declared:
                    raise _FetchFailed(f"transfer cut short: received {received} of {declared} bytes",
                                       retry=True, reached=True)
                if h.hexdigest() != md5:
                    raise _FetchFailed(f"md5 mismatch: got {h.hexdigest()}, expected {md5} ({received} bytes)",
                                       retry=False, reached=True)
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, target)
        tmp = None
        fsync_directory(target.parent)
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, IncompleteRead, disk errors
        raise _FetchFailed(f"{type(exc).__name__}: {exc}", retry=True, reached=answered) from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _offline_hint(name: str) -> str:
    return (f"If you already have the files, put them in a folder (directly or in a '{name}/' "
            f"sub-folder) and pass --data-dir DIR or set NPVAE_DATA_DIR=DIR. Without a dataset "
            f"name, npvae falls back to the 5,000 demo digits it ships with.")


def download(name: str, dest_dir, mirrors: Sequence[str] | None = None, retries: int = 3,
             timeout: float = 30, *, splits: str | Sequence[str] = SPLITS, backoff: float = 1.0,
             max_bytes: int = 64 * 1024**2) -> list[Path]:
    """Download the files of ``name`` into ``dest_dir``, verified and atomically.

    Each file goes to a temporary file in ``dest_dir``, is checked against its md5 (and, when the
    server sent a Content-Length, its length), fsynced, and renamed into place with
    :func:`os.replace`; a corrupt or cut-short transfer is deleted, never left in the folder.
    Files already present with the right contents are kept.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist"}
    dest_dir : str or os.PathLike
        Folder the files land in (created if needed), e.g. ``cache_dir() / "mnist"``.
    mirrors : sequence of str, optional
        Base URLs tried in order (default: the dataset's public mirrors).
    retries : int
        Attempts per mirror for transient failures (timeouts, resets, 5xx, short transfers),
        with exponential backoff ``backoff * 2**k`` seconds between them. A 4xx answer, a
        checksum mismatch or a host name that does not resolve moves on to the next mirror at once.
    timeout : float
        Socket timeout in seconds for each connection and read.
    splits : "train", "test" or a sequence of them
        Which files to fetch (default: all four).
    backoff : float
        First backoff delay in seconds.
    max_bytes : int
        Largest response accepted for one file.

    Returns
    -------
    paths : list of pathlib.Path
        The files, images then labels for each split.

    Raises
    ------
    DownloadError
        A file could not be fetched from any mirror; the message lists every attempt's failure.
    """
    spec = _spec(name)
    if retries < 1:
        raise ValueError(f"expected retries >= 1, got {retries}")
    mirrors = tuple(spec.mirrors if mirrors is None else mirrors)
    if not mirrors:
        raise ValueError("expected at least one mirror URL, got none")
    roles = _roles(splits)
    dest = Path(dest_dir)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for role in roles:
            spec_file = spec.files[role]
            target = dest / spec_file.filename
            if not (target.is_file() and (_md5_file(target) == spec_file.md5 or _contents_match(target, spec_file))):
                _download_file(spec, spec_file, target, mirrors, retries, timeout, backoff, max_bytes)
            paths.append(target)
    except DownloadError:
        if created and not any(dest.iterdir()):
            dest.rmdir()
        raise
    return paths


def _download_file(spec: DatasetSpec, spec_file: IDXFile, target: Path, mirrors, retries: int,
                   timeout: float, backoff: float, max_bytes: int) -> None:
    failures, reached = [], False
    for mirror in mirrors:
        url = (mirror if mirror.endswith("/") else mirror + "/") + spec_file.filename
        for attempt in range(retries):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                _fetch(url, target, spec_file.md5, timeout, max_bytes)
                return
            except _FetchFailed as exc:
                failures.append(f"{url} (attempt {attempt + 1}/{retries}): {exc}")
                reached = reached or exc.reached
                if not exc.retry:
                    break
    cause = ("the mirrors answered but did not deliver a valid copy" if reached
             else "this machine seems to be offline (no mirror could be reached)")
    raise DownloadError(
        f"could not download {spec.title} file {spec_file.filename}: {cause}.\n  "
        + "\n  ".join(failures) + "\n" + _offline_hint(spec.name))


# ----------------------------------------------------------------------------- loading


def _read_checked(path: Path, spec_file: IDXFile, verify: bool) -> np.ndarray:
    h = hashlib.md5(usedforsecurity=False) if verify else None
    array = _read_idx(path, MAX_IDX_BYTES, md5=h)
    if verify and h.hexdigest() != spec_file.raw_md5:
        raise IDXFormatError(
            f"{path}: contents differ from the official {spec_file.raw_filename} (md5 of the "
            f"decompressed data {h.hexdigest()}, expected {spec_file.raw_md5}): the file is corrupt "
            f"or belongs to another dataset. Delete it to have it downloaded again, or pass verify=False.")
    return array


def _load_split(spec: DatasetSpec, split: str, data_dir, allow_download: bool,
                verify: bool) -> tuple[np.ndarray, np.ndarray, Path]:
    """Images (N, 784) uint8, labels (N,) uint8 and the folder they came from."""
    roles = _roles(split)
    folder = find_dataset_dir(spec.name, data_dir, split, verify)
    if folder is None:
        if not allow_download:
            searched = ", ".join(str(r) for r in _search_roots(spec.name, data_dir))
            names = " and ".join(spec.files[r].filename for r in roles)
            rejected = [str(f) for f, ok in _candidates(spec, data_dir, roles, verify) if not ok]
            why = (f" ({', '.join(rejected)} has files of these names, but their labels are not "
                   f"{spec.title}'s: another dataset? pass verify=False to use them anyway)") if rejected else ""
            raise FileNotFoundError(
                f"{spec.title} {split} files ({names}, gzipped or not) not found in any of: {searched}{why}. "
                f"Allow downloading, or: {_offline_hint(spec.name)}")
        folder = _download_root(spec.name, data_dir)
        download(spec.name, folder, splits=split)
    images_file, labels_file = (spec.files[r] for r in roles)
    images_path, labels_path = _locate(folder, images_file), _locate(folder, labels_file)
    images = _read_checked(images_path, images_file, verify)
    labels = _read_checked(labels_path, labels_file, verify)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise IDXFormatError(f"{images_path}: expected uint8 images of shape (N, 28, 28), got "
                             f"{images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IDXFormatError(f"{labels_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise IDXFormatError(f"{labels_path}: {labels.shape[0]} labels for the {images.shape[0]} images in "
                             f"{images_path}: the two files must have the same count")
    if labels.size and labels.max() >= 10:
        raise IDXFormatError(f"{labels_path}: expected labels 0..9, found {labels.max()}")
    return images.reshape(images.shape[0], 784), labels, folder


def _download_root(name: str, data_dir) -> Path:
    # NPVAE_DATA_DIR is often a read-only shared copy, so downloads go to data_dir or the cache.
    base = Path(data_dir).expanduser() if data_dir is not None else cache_dir()
    return base / name


def load_mnist_like(name: str, split: str, data_dir=None, download: bool = True,
                    verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of MNIST or Fashion-MNIST.

    Files are found by :func:`find_dataset_dir`; missing ones are downloaded (if allowed) into
    ``data_dir/NAME`` when ``data_dir`` is given, else into ``cache_dir()/NAME``.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist"}
    split : {"train", "test"}
        ``"test"`` is the official t10k split.
    data_dir : str or os.PathLike, optional
        Searched first, and the download destination.
    download : bool
        Fetch missing files from the mirrors.
    verify : bool
        Check the md5 of the decompressed contents against the official files.

    Returns
    -------
    images : (N, 784) uint8 array
        Rows of 28x28 images, 0 = background.
    labels : (N,) uint8 array
        Classes 0..9. N is 60,000 for train, 10,000 for test.

    Raises
    ------
    FileNotFoundError
        The files are not on disk and ``download`` is False.
    DownloadError
        They are not on disk and could not be downloaded.
    IDXFormatError
        A file is malformed, has the wrong contents (``verify``), or images and labels disagree.
    """
    images, labels, _ = _load_split(_spec(name), split, data_dir, download, verify)
    return images, labels


@dataclass(repr=False)
class Dataset:
    """Train / validation / test arrays, ready for training."""

    name: str              # "mnist", "fashion-mnist" or "demo"
    train_x: np.ndarray    # (N_train, 784) uint8
    train_y: np.ndarray    # (N_train,) uint8
    val_x: np.ndarray      # (N_val, 784) uint8, held out from the training split
    val_y: np.ndarray      # (N_val,) uint8
    test_x: np.ndarray     # (N_test, 784) uint8; for the demo, the validation arrays again
    test_y: np.ndarray     # (N_test,) uint8
    num_classes: int       # 10
    description: str       # one human line: which data, how split, from where
    is_demo: bool          # True for the shipped 5,000-digit subset

    def __post_init__(self):
        for part in ("train", "val", "test"):
            x, y = getattr(self, f"{part}_x"), getattr(self, f"{part}_y")
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 784:
                raise ValueError(f"expected {part}_x of shape (N, 784) and dtype uint8, got {x.shape} {x.dtype}")
            if y.dtype != np.uint8 or y.shape != (x.shape[0],):
                raise ValueError(f"expected {part}_y of shape ({x.shape[0]},) and dtype uint8, got {y.shape} {y.dtype}")

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, train={self.train_x.shape}, val={self.val_x.shape}, "
                f"test={self.test_x.shape}, is_demo={self.is_demo})")


DEMO_SIZE = 5000  # digits in mnist_demo.npz, 500 per class


def _read_demo() -> tuple[np.ndarray, np.ndarray]:
    ref = resources.files("npvae") / "_resources" / "mnist_demo.npz"
    with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"]
    if images.shape != (DEMO_SIZE, 784) or images.dtype != np.uint8 or labels.shape != (DEMO_SIZE,):
        raise ValueError(f"{ref}: expected images (5000, 784) uint8 and labels (5000,), got "
                         f"{images.shape} {images.dtype} and {labels.shape}; reinstall npvae or rerun "
                         f"scripts/make_demo_data.py")
    return images, labels.astype(np.uint8, copy=False)


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``round(val_fraction * n_c)`` of each class c in validation, both in
    a seeded shuffled order so that any prefix mixes the classes."""
    rng = np.random.default_rng(seed)
    val_parts, train_parts = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(math.floor(val_fraction * idx.size + 0.5))
        if not 0 < k < idx.size:
            raise ValueError(f"val_fraction={val_fraction} puts {k} of the {idx.size} examples of class {c} "
                             f"in validation; every class needs at least one in each split")
        val_parts.append(idx[:k])
        train_parts.append(idx[k:])
    return rng.permutation(np.concatenate(train_parts)), rng.permutation(np.concatenate(val_parts))


def load_demo(val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """The 5,000 real MNIST digits shipped with npvae, split stratified and deterministically.

    See ``npvae/_resources/DEMO_DATA.md`` for their source and licence. There is no separate test
    split: ``test_x``/``test_y`` are the validation arrays, as ``description`` says.

    Parameters
    ----------
    val_fraction : float
        Fraction of each class held out for validation, in (0, 1); the default gives
        4,500 train / 500 validation (50 per class).
    seed : int
        Seeds which digits are held out and the order of both splits.

    Returns
    -------
    dataset : Dataset
        ``name="demo"``, ``is_demo=True``.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"expected val_fraction in (0, 1), got {val_fraction}")
    images, labels = _read_demo()
    train_idx, val_idx = _stratified_split(labels, val_fraction, seed)
    val_x, val_y = images[val_idx], labels[val_idx]
    description = (f"demo subset: {DEMO_SIZE:,} real MNIST digits shipped with npvae "
                   f"({train_idx.size:,} train / {val_idx.size:,} validation, stratified, seed {seed}; "
                   f"test = validation) — not the full dataset")
    return Dataset("demo", images[train_idx], labels[train_idx], val_x, val_y, val_x, val_y,
                   num_classes=10, description=description, is_demo=True)


def _reachable(urls: Sequence[str], timeout: float = 2.0) -> bool:
    """One quick TCP connection to the first mirror (or its proxy): do not wait out retries
    when offline."""
    parts = urllib.parse.urlsplit(urls[0])
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_dataset(name: str | None = None, data_dir=None, val_size: int | None = None, seed: int = 0,
                 download: bool = True) -> Dataset:
    """The single entry point for training data.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist", "demo"} or None
        None means full MNIST if it is on disk or can be downloaded (one quick connection test
        first, so an offline machine does not wait out retries), else the demo digits; the
        returned ``description`` says which was used and why.
    data_dir : str or os.PathLike, optional
        Searched first for the files (see :func:`find_dataset_dir`), and the download destination.
    val_size : int, optional
        Validation examples held out of the training split: default 5,000 for MNIST and
        Fashion-MNIST (a seeded random subset; the official test split stays the test set).
        For ``"demo"``, held out stratified per class (default 500, 50 per class); ignored when
        ``name=None`` falls back to the demo.
    seed : int
        Seeds the validation split.
    download : bool
        Allow downloading missing files.

    Returns
    -------
    dataset : Dataset
    """
    if name is None:
        return _load_default(data_dir, val_size, seed, download)
    key = name.lower().replace("_", "-")
    if key == "demo":
        if val_size is None:
            return load_demo(seed=seed)
        return load_demo(val_fraction=_check_val_size(val_size, DEMO_SIZE) / DEMO_SIZE, seed=seed)
    spec = _spec(key)
    train_x, train_y, train_dir = _load_split(spec, "train", data_dir, download, verify=True)
    test_x, test_y, test_dir = _load_split(spec, "test", data_dir, download, verify=True)
    n_val = _check_val_size(5000 if val_size is None else val_size, train_x.shape[0])
    perm = np.random.default_rng(seed).permutation(train_x.shape[0])
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    where = str(train_dir) if train_dir == test_dir else f"{train_dir} (train) and {test_dir} (test)"
    description = (f"{spec.title} ({train_idx.size:,} train / {n_val:,} validation / {test_x.shape[0]:,} test) "
                   f"from {where}")
    return Dataset(spec.name, train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx],
                   test_x, test_y, num_classes=10, description=description, is_demo=False)


def _check_val_size(val_size, n: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or not 0 <= val_size < n:
        raise ValueError(f"expected val_size an integer in [0, {n}), got {val_size!r}")
    return int(val_size)


def _load_default(data_dir, val_size, seed: int, allow_download: bool) -> Dataset:
    spec = DATASETS["mnist"]
    if find_dataset_dir("mnist", data_dir) is not None:
        return load_dataset("mnist", data_dir, val_size, seed, download=False)
    if not allow_download:
        reason = "full MNIST not found on disk and downloads are disabled"
    elif not _reachable(spec.mirrors):
        reason = "full MNIST not found on disk and the machine seems to be offline"
    else:
        try:
            return load_dataset("mnist", data_dir, val_size, seed, download=True)
        except DownloadError as exc:
            reason = f"full MNIST not found on disk and the download failed: {str(exc).splitlines()[0]}"
    demo = load_demo(seed=seed)
    demo.description += f" (using it because {reason})"
    return demo


# ----------------------------------------------------------------------------- preprocessing


def _check_probabilities(x, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected {name} of dtype float32 or float64 (see to_float), got {x.dtype}")
    if x.size:
        # min/max propagate NaN, so two reductions check finiteness and range without a mask.
        lo, hi = x.min(), x.max()
        if np.isnan(lo) or np.isnan(hi):
            raise ValueError(f"expected {name} with values in [0, 1], found NaN")
        if lo < 0 or hi > 1:
            raise ValueError(f"expected {name} with values in [0, 1] (Bernoulli means), got range [{lo}, {hi}]")
    return x


def to_float(images, value_range: tuple[float, float] = (0.0, 1.0), dtype=np.float32) -> np.ndarray:
    """Scale pixels to floats in ``value_range``.

    .. math:: x = lo + (hi - lo) \\cdot \\text{pixel} / 255

    Parameters
    ----------
    images : (N, D) array
        uint8 pixels 0..255, or floats already in [0, 1] (bool counts as 0/1).
    value_range : (lo, hi)
        Target range, e.g. (0, 1) for Bernoulli decoders or (-1, 1); lo < hi, both finite.
    dtype : float32 or float64

    Returns
    -------
    x : (N, D) array of ``dtype``
        A new array; 0 maps to exactly ``lo`` and 255 (or 1.0) to exactly ``hi``.
    """
    x = np.asarray(images)
    if x.ndim != 2:
        raise ValueError(f"expected images of shape (N, D), e.g. (N, 784), got shape {x.shape}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"expected dtype float32 or float64, got {dtype}")
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"expected value_range (lo, hi) with finite lo < hi, got {value_range}")
    if x.dtype == np.uint8:
        out = x.astype(dtype)
        out /= 255
    elif x.dtype == np.bool_:
        out = x.astype(dtype)
    elif x.dtype.kind == "f":
        _check_probabilities(x.astype(dtype, copy=False), "images")
        out = x.astype(dtype)
    else:
        raise TypeError(f"expected images of dtype uint8 (0..255) or float (in [0, 1]), got {x.dtype}")
    if (lo, hi) != (0.0, 1.0):
        out *= hi - lo
        out += lo
    return out


def binarize_static(x, rng: np.random.Generator | None = None) -> np.ndarray:
    """Binarise once, for a fixed binary dataset: a Bernoulli draw, or a threshold at 0.5.

    .. math:: b = \\mathbb{1}[u < x],\\ u \\sim U(0, 1) \\quad\\text{or}\\quad b = \\mathbb{1}[x > 0.5]

    Parameters
    ----------
    x : (N, D) float32 or float64 array
        Intensities in [0, 1] (see :func:`to_float`).
    rng : np.random.Generator, optional
        Source of the single draw; None thresholds at 0.5 instead.

    Returns
    -------
    b : (N, D) array of x's dtype, values in {0, 1}
    """
    x = _check_probabilities(x)
    if rng is None:
        return (x > 0.5).astype(x.dtype)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"expected rng to be an np.random.Generator or None, got {type(rng).__name__}")
    return (rng.random(x.shape, dtype=x.dtype) < x).astype(x.dtype)


def binarize_dynamic(x, rng: np.random.Generator, out: np.ndarray | None = None) -> np.ndarray:
    """A fresh Bernoulli draw on every call (dynamic binarisation, one per minibatch).

    .. math:: b = \\mathbb{1}[u < x],\\ u \\sim U(0, 1)

    Parameters
    ----------
    x : (B, D) float32 or float64 array
        Intensities in [0, 1].
    rng : np.random.Generator
    out : (B, D) array, optional
        C-contiguous float32/float64 buffer to write into. When it does not overlap ``x`` the
        uniforms are drawn straight into it and nothing is allocated; ``out=x`` (binarise in
        place) works too, at the cost of one temporary for the uniforms.

    Returns
    -------
    b : (B, D) array, values in {0, 1}
        ``out`` if given, else a new array of x's dtype.
    """
    x = _check_probabilities(x)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"expected rng to be an np.random.Generator, got {type(rng).__name__}")
    if out is None:
        out = np.empty(x.shape, dtype=x.dtype)
    else:
        if not isinstance(out, np.ndarray) or out.shape != x.shape or out.dtype not in (np.float32, np.float64):
            raise ValueError(f"expected out of shape {x.shape} and dtype float32 or float64, got "
                             f"{getattr(out, 'shape', None)} {getattr(out, 'dtype', type(out).__name__)}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("expected out to be a writeable C-contiguous array")
        if np.may_share_memory(out, x):
            # Drawing into out would overwrite x before the comparison reads it. The same
            # generator calls give the same uniforms, so the result matches the separate-buffer path.
            np.less(rng.random(out.shape, dtype=out.dtype), x, out=out)
            return out
    rng.random(dtype=out.dtype, out=out)
    np.less(out, x, out=out)
    return out


# ----------------------------------------------------------------------------- batching


def _check_nonneg_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"expected {name} a non-negative integer, got {value!r}")
    return int(value)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The example order of one epoch, a pure function of ``(seed, epoch)``.

    Drawn from ``np.random.default_rng([seed, epoch])``, so a run resumed at epoch k visits the
    examples in exactly the order an uninterrupted run would, without replaying earlier epochs.

    Returns
    -------
    perm : (n,) int64 array
        A permutation of ``0..n-1``.
    """
    seed = _check_nonneg_int(seed, "seed")
    epoch = _check_nonneg_int(epoch, "epoch")
    n = _check_nonneg_int(n, "n")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def batch_indices(n: int, batch_size: int, perm: np.ndarray | None = None,
                  drop_last: bool = False) -> Iterator[np.ndarray]:
    """Split ``perm`` (default ``0..n-1``) into consecutive batches of indices.

    Parameters
    ----------
    n : int
        Number of examples.
    batch_size : int
        At least 1.
    perm : (n,) integer array, optional
        The order, e.g. :func:`epoch_permutation`.
    drop_last : bool
        Skip a final batch smaller than ``batch_size``.

    Yields
    ------
    idx : (b,) int64 array
        Views into ``perm``, ``b == batch_size`` except possibly the last.
    """
    n = _check_nonneg_int(n, "n")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"expected batch_size a positive integer, got {batch_size!r}")
    if perm is None:
        perm = np.arange(n, dtype=np.int64)
    else:
        perm = np.asarray(perm)
        if perm.shape != (n,) or perm.dtype.kind not in "iu":
            raise ValueError(f"expected perm an integer array of shape ({n},), got {perm.dtype} {perm.shape}")
    stop = n - n % batch_size if drop_last else n
    return (perm[start:start + batch_size] for start in range(0, stop, int(batch_size)))
