"""Where MNIST and Fashion-MNIST come from: their specs, the folders searched, the download.

- :data:`DATASETS` holds each dataset's mirrors and, per file, two checksums: ``md5`` of the
  ``.gz`` as the mirrors serve it (checked on download), and ``raw_md5`` of the decompressed IDX
  bytes (checked on load). The second holds for any re-compressed copy: Debian's package and the
  copies in ``shared/data`` are re-gzipped, so their ``.gz`` checksums differ from the mirrors'
  while their contents are identical.
- :func:`find_dataset_dir` looks in an explicit ``data_dir``, ``$NPVAE_DATA_DIR``, the user cache
  (:func:`cache_dir`: ``$XDG_CACHE_HOME/npvae`` or ``~/.cache/npvae``) and Debian's
  ``/usr/share/datasets/fashion-mnist``; missing files are fetched by :func:`download`
  (:mod:`urllib`, verified, atomic).
- :func:`load_mnist_like` returns one split as ``(N, 784)`` uint8 images and ``(N,)`` uint8 labels.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..checkpoint import fsync_directory
from ..registry import Registry
from .idx import _CHUNK, MAX_IDX_BYTES, IDXFormatError, _read_idx

__all__ = [
    "DownloadError", "IDXFile", "DatasetSpec", "DATASETS", "SPLITS", "SYSTEM_DATA_DIRS",
    "cache_dir", "find_dataset_dir", "download", "load_mnist_like",
]


class DownloadError(OSError):
    """Every mirror failed to deliver a file with the expected checksum."""


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
    class_names: tuple[str, ...] = ()  # what each label means, indexed by label (pictures name classes with it)


# The .gz md5s are torchvision's; the raw md5s are those of the decompressed files, as published
# for the original releases. Both were checked against shared/data: every raw md5 matches there
# (MNIST t10k images and labels, train labels; all four Fashion-MNIST files), while the .gz md5s
# do not, because those copies were re-compressed (Fashion-MNIST's come from Debian's package).
DATASETS: Registry[DatasetSpec] = Registry("dataset")
for _spec_entry in (
    DatasetSpec(
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
        class_names=tuple(str(d) for d in range(10)),
    ),
    DatasetSpec(
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
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
):
    DATASETS.register(_spec_entry)
del _spec_entry
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


def _fetch(url: str, target: Path, md5: str, timeout: float, max_bytes: int, deadline: float = math.inf) -> None:
    """Stream ``url`` to a temporary file beside ``target``; move it into place only if complete
    and its md5 matches, within ``deadline`` seconds in all. Nothing is left behind on failure or
    interrupt."""
    give_up = time.monotonic() + deadline
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
                # read1 returns what one recv brings, so a server trickling bytes (each read within the
                # socket timeout) still meets the overall deadline
                while chunk := response.read1(1 << 16):
                    if time.monotonic() > give_up:
                        raise _FetchFailed(f"gave up after {deadline:g} s with {received + len(chunk)} bytes: the "
                                           "server is too slow", retry=False, reached=True)
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


def _explain_folder(spec: DatasetSpec, data_dir, roles: list[str], verify: bool) -> str | None:
    """What a given data folder lacks or holds wrongly for ``roles`` (None without a data_dir)."""
    if data_dir is None:
        return None
    root = Path(data_dir).expanduser()
    names = [spec.files[r].filename for r in roles]
    if not root.is_dir():
        return f"{root} is not a folder"
    for folder in (root / spec.name, root):
        found = {role: _locate(folder, spec.files[role]) for role in roles}
        if not any(found.values()):
            continue
        missing = [spec.files[r].filename for r in roles if found[r] is None]
        rejected = [str(found[r]) for r in roles if found[r] is not None and r.endswith("labels") and verify
                    and not _contents_match(found[r], spec.files[r])]
        parts = [f"{folder} lacks {', '.join(missing)}"] if missing else []
        if rejected:
            parts.append(f"{', '.join(rejected)} {'does' if len(rejected) == 1 else 'do'} not hold {spec.title}'s "
                         "labels (another dataset?)")
        return "; ".join(parts) or None
    return f"{root} holds none of {', '.join(names)} (directly or in a '{spec.name}/' sub-folder)"


def _offline_hint(name: str) -> str:
    return (f"If you already have the files, put them in a folder (directly or in a '{name}/' "
            f"sub-folder) and pass --data-dir DIR or set NPVAE_DATA_DIR=DIR. Without a dataset "
            f"name, npvae falls back to the 5,000 demo digits it ships with.")


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


def download(name: str, dest_dir, mirrors: Sequence[str] | None = None, retries: int = 3,
             timeout: float = 30, *, splits: str | Sequence[str] = SPLITS, backoff: float = 1.0,
             max_bytes: int = 64 * 1024**2, deadline: float = 900) -> list[Path]:
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
    deadline : float
        Seconds one transfer may take in all (a server that trickles bytes is given up on, and
        the next mirror tried); the socket ``timeout`` bounds each wait within it.

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
    created = [folder for folder in (dest, *dest.parents) if not folder.exists()]  # deepest first
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for role in roles:
            spec_file = spec.files[role]
            target = dest / spec_file.filename
            if not (target.is_file() and (_md5_file(target) == spec_file.md5 or _contents_match(target, spec_file))):
                _download_file(spec, spec_file, target, mirrors, retries, timeout, backoff, max_bytes, deadline)
            paths.append(target)
    except BaseException:  # a failure, Ctrl-C or SIGTERM: the folders made for nothing go too (--data-dir ~/data)
        _remove_empty(created)
        raise
    return paths


def _remove_empty(folders: list[Path]) -> None:
    """Remove each folder (deepest first) that is still empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()  # refuses a folder that is not empty
        except OSError:
            return


def _download_file(spec: DatasetSpec, spec_file: IDXFile, target: Path, mirrors, retries: int,
                   timeout: float, backoff: float, max_bytes: int, deadline: float) -> None:
    failures, reached = [], False
    for mirror in mirrors:
        url = (mirror if mirror.endswith("/") else mirror + "/") + spec_file.filename
        for attempt in range(retries):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                _fetch(url, target, spec_file.md5, timeout, max_bytes, deadline)
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
            problem = _explain_folder(spec, data_dir, roles, verify)
            why += f" ({problem})" if problem and not rejected else ""
            raise FileNotFoundError(
                f"{spec.title} {split} files ({names}, gzipped or not) not found in any of: {searched}{why}. "
                f"Allow downloading, or: {_offline_hint(spec.name)}")
        folder = _download_root(spec.name, data_dir)
        try:
            download(spec.name, folder, splits=split)
        except DownloadError as exc:
            problem = _explain_folder(spec, data_dir, roles, verify)
            if problem is None:
                raise
            raise DownloadError(f"{spec.title} {split} files: {problem}, and fetching them failed: {exc}") from None
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
