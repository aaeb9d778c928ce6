"""A user's own data from disk: a ``.npy`` or ``.npz`` file, or a folder of images.

:func:`load_path` is the one entry point; it returns a :class:`~npvae.data.Dataset` with a
validation set split off (see :meth:`Dataset.from_arrays`). What it reads:

- ``.npy``: the array is ``x``, shape ``(N, ...)``. ``target`` may name a second ``.npy`` of
  paired targets.
- ``.npz``: arrays ``x`` (required), ``y`` (integer labels, optional) and ``target`` (paired
  targets, optional); any other name is refused. Files are always read with
  ``allow_pickle=False``: object arrays are refused.
- a folder: every ``.png``, ``.jpg`` and ``.jpeg`` file in it (sorted by name; sub-folders and
  other files ignored), all of one size. Grayscale -> ``(N, H, W)`` uint8, colour ->
  ``(N, H, W, 3)`` uint8; alpha is dropped, and a folder mixing gray and colour images is read
  as colour (gray pixels repeated into R, G and B). ``target`` may name a second folder holding
  an image of the same name and size for every input (denoising: noisy scan -> clean scan).

Images are decoded by Pillow when it can be imported (it also reads JPEG; matplotlib brings it),
else PNGs by :mod:`npvae.data.png` (standard library only). Every problem raises one line,
a :class:`DataFileError` naming the file.
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .. import memory
from ..checkpoint import CheckpointError, kind_of, npz_names, open_regular, read_npy, read_npz_members
from . import png
from .datasets import Dataset

__all__ = ["DataFileError", "IMAGE_SUFFIXES", "load_path"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_NPZ_NAMES = ("x", "y", "target")
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_PILLOW_HINT = "pip install pillow (or pip install 'npvae[plot]': matplotlib brings it)"


class DataFileError(ValueError):
    """A data file or folder cannot be used; the message names it and says what to do."""


def load_path(path, target=None, *, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Read a ``.npy`` / ``.npz`` file or a folder of images into a :class:`Dataset`.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.npy`` file (the examples ``x``), a ``.npz`` file (``x``, optional ``y`` and
        ``target``) or a folder of ``.png`` / ``.jpg`` / ``.jpeg`` images.
    target : str or os.PathLike, optional
        Paired targets: a ``.npy`` file beside a ``.npy`` ``path``, or a folder with an image of
        the same file name and size for every image of a folder ``path``. (A ``.npz`` carries its
        targets as the array ``target``.)
    val_fraction : float
        Share held out for validation, in (0, 1): stratified by label when there are labels.
    seed : int
        Seeds the split.

    Returns
    -------
    dataset : Dataset
        ``name`` is the file or folder name without suffix; ``test_*`` are the validation
        arrays; ``source`` is ``{"kind": "path", "path": ABSOLUTE PATH, "target": ABSOLUTE
        PATH or None}``; ``description`` says what was read and how it was split.

    Raises
    ------
    DataFileError
        (a ValueError) A path that does not exist, an unknown suffix, a folder without images,
        images of different sizes, a missing target image, a corrupt file, an object array,
        unexpected ``.npz`` members, non-numeric data, NaN/inf, fewer than 2 examples.
    ImportError
        A JPEG file and no Pillow.
    """
    path = _existing(path, "path")
    target = None if target is None else _existing(target, "target")
    if path.is_dir():
        if target is not None and not target.is_dir():
            raise DataFileError(f"target {target} is not a folder: with a folder of images, target must be a "
                                f"folder with an image of the same name for each input")
        x, names = _read_folder(path)
        y = None
        t = None if target is None else _read_targets(target, names, path, x.shape[1:3])
        read = f"{x.shape[0]:,} images of {_pixels(x)} from {path}"
        if t is not None:
            read += f", paired with {_pixels(t)} targets from {target}"
    elif path.suffix.lower() == ".npy":
        if target is not None and (not target.is_file() or target.suffix.lower() != ".npy"):
            raise DataFileError(f"target {target} is not a .npy file: with a .npy path, target must be a .npy file "
                                f"of paired targets (one row per example)")
        x, y = _load_npy(path), None
        t = None if target is None else _load_npy(target)
        read = f"x {_shape(x)} {x.dtype} from {path}" + ("" if t is None else
                                                          f", target {_shape(t)} {t.dtype} from {target}")
    elif path.suffix.lower() == ".npz":
        if target is not None:
            raise DataFileError(f"a .npz file carries its targets as the array 'target': save them into {path.name} "
                                f"instead of passing target={str(target)!r}")
        arrays = _load_npz(path)
        x, y, t = arrays["x"], arrays.get("y"), arrays.get("target")
        read = f"x {_shape(x)} {x.dtype}" + ("" if y is None else f", y {_shape(y)} {y.dtype}") + \
            ("" if t is None else f", target {_shape(t)} {t.dtype}") + f" from {path}"
    else:
        raise DataFileError(f"{path}: unknown suffix {path.suffix or '(none)'!r}: expected a .npy or .npz file, or "
                            f"a folder of .png / .jpg / .jpeg images")
    source = {"kind": "path", "path": str(path), "target": None if target is None else str(target)}
    name = path.name if path.is_dir() else path.stem
    try:
        dataset = Dataset.from_arrays(x, y, t, val_fraction=val_fraction, seed=seed, name=name, source=source)
    except (TypeError, ValueError) as exc:
        raise DataFileError(f"{path}: {exc}") from None
    how = "stratified by label, " if dataset.has_labels else ""
    dataset.description = (f"{name}: {read}; {dataset.train_x.shape[0]:,} train / {dataset.val_x.shape[0]:,} "
                           f"validation ({how}seed {seed}; test = validation)")
    return dataset


def _existing(path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataFileError(f"{what} {p}: no such file or folder")
    return p.resolve()


def _shape(a: np.ndarray) -> str:
    return str(tuple(a.shape))


def _pixels(images: np.ndarray) -> str:
    """E.g. ``28x28 gray`` or ``64x48 RGB`` (height x width)."""
    return f"{images.shape[1]}x{images.shape[2]} {'RGB' if images.ndim == 4 else 'gray'}"


# ----------------------------------------------------------------------------- NumPy files


def _check_magic(f, path: Path, magics: tuple[bytes, ...], what: str) -> None:
    head = f.read(8)
    f.seek(0)
    if not head.startswith(magics):
        raise DataFileError(f"{path}: not a NumPy {what} file (it starts with {head.hex(' ') or 'nothing'}); "
                            f"save arrays with np.{'save' if what == '.npy' else 'savez'}")


def _load_npy(path: Path) -> np.ndarray:
    """The array of a ``.npy`` file, its header checked against the file's size before anything is
    allocated (a crafted header cannot ask for more memory than the file holds)."""
    try:
        with open_regular(path, DataFileError, "data file") as f:
            _check_magic(f, path, (_NPY_MAGIC,), ".npy")
            return read_npy(f, os.fstat(f.fileno()).st_size, "x")
    except DataFileError:
        raise
    except CheckpointError as exc:
        raise DataFileError(f"{path}: cannot read this .npy file: {exc}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise DataFileError(f"{path}: cannot read this .npy file ({exc}); is it corrupt or truncated?") from None


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (x, and optionally y and target), each read by the checkpoint reader:
    sizes checked against headers before allocating, CRCs verified, object arrays refused."""
    try:
        with open_regular(path, DataFileError, "data file") as f:
            _check_magic(f, path, _ZIP_MAGICS, ".npz")
            return _read_npz_arrays(f, path)
    except CheckpointError as exc:
        raise DataFileError(f"{path}: cannot read this .npz: {exc}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        if isinstance(exc, DataFileError):
            raise
        raise DataFileError(f"{path}: cannot read this .npz file ({exc}); is it corrupt?") from None


def _read_npz_arrays(f, path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(f) as zf:
        names = [info.filename[: -len(".npy")] for info in zf.infolist()]
        held = ", ".join(names) or "nothing"
        unexpected = [n for n in names if n not in _NPZ_NAMES]
        if unexpected:
            raise DataFileError(f"{path}: unexpected array {unexpected[0]!r} in the .npz (it holds {held}); "
                                f"allowed names are x (required), y (integer labels) and target (paired targets)")
        if "x" not in names:
            raise DataFileError(f"{path}: no array 'x' in the .npz (it holds {held}); save with "
                                f"np.savez(path, x=..., y=..., target=...) (y and target optional)")
        npz_names(zf)  # encrypted members and unknown compression: refused before any is read
    f.seek(0)
    arrays = {}
    for name, array in read_npz_members(f):
        if name in arrays:
            raise DataFileError(f"{path}: array {name!r} appears twice")
        arrays[name] = array
    return arrays


# ----------------------------------------------------------------------------- image folders


def _image_files(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted by name; a broken link or a FIFO, device or socket named like an
    image is refused (sub-folders are skipped, as documented)."""
    files = []
    for p in folder.iterdir():
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            mode = p.stat().st_mode
        except FileNotFoundError:
            raise DataFileError(f"{p}: a broken symbolic link (to {os.readlink(p)}); remove it or restore "
                                "its target") from None
        if stat.S_ISREG(mode):
            files.append(p)
        elif not stat.S_ISDIR(mode):
            raise DataFileError(f"{p} is {kind_of(mode)}, not an image file; remove it from the folder")
    return sorted(files, key=lambda p: p.name)


def _read_folder(folder: Path) -> tuple[np.ndarray, list[str]]:
    """Every image in ``folder``: (N, H, W) or (N, H, W, 3) uint8 and the file names, sorted."""
    files = _image_files(folder)
    if not files:
        raise DataFileError(f"{folder}: no .png, .jpg or .jpeg images in this folder (sub-folders are not searched)")
    return _read_images(files), [p.name for p in files]


def _read_targets(folder: Path, names: list[str], inputs: Path, size: tuple[int, int]) -> np.ndarray:
    """The image of each name in ``folder``, each of the inputs' size (height, width)."""
    present = {p.name for p in _image_files(folder)}
    for n in names:
        if n not in present:
            raise DataFileError(f"target folder {folder} has no image named {n} (the target of {inputs / n}); every "
                                f"input image needs a target of the same file name")
    files = [folder / n for n in names]
    targets = _read_images(files)
    if targets.shape[1:3] != size:
        raise DataFileError(f"target {files[0]} is {_hw(targets.shape[1:3])} but its input {inputs / names[0]} is "
                            f"{_hw(size)} (height x width); every target must have its input's size")
    return targets


def _hw(size) -> str:
    return f"{size[0]}x{size[1]}"


def _read_images(files: list[Path]) -> np.ndarray:
    """Decode and stack: all of one size; gray promoted to RGB when any image is colour."""
    image_module = _pillow()
    images = []
    for f in files:
        img = _read_image(f, image_module)
        if not images:  # every image of this size, and the stack of them
            memory.check(2 * len(files) * img.nbytes * (3 if img.ndim == 2 else 1),
                         f"reading {len(files):,} images of {_hw(img.shape)}", "use fewer or smaller images (or "
                         "tiles of them)", source=str(f.parent))
        if images and img.shape[:2] != images[0].shape[:2]:
            raise DataFileError(f"images differ in size: {files[0]} is {_hw(images[0].shape)} but {f} is "
                                f"{_hw(img.shape)} (height x width); resize them to one size")
        images.append(img)
    if any(img.ndim == 3 for img in images):
        images = [img if img.ndim == 3 else np.repeat(img[:, :, None], 3, axis=2) for img in images]
    return np.stack(images)


def _pillow():
    """``PIL.Image``, or None when Pillow is not installed (then PNGs are decoded by :mod:`.png`)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def _read_image(path: Path, image_module) -> np.ndarray:
    """One image as (H, W) or (H, W, 3) uint8."""
    if image_module is None:
        if path.suffix.lower() != ".png":
            raise ImportError(f"{path}: reading JPEG files needs Pillow: {_PILLOW_HINT}")
        try:
            return png.read_png(path)
        except png.PNGFormatError as exc:
            raise DataFileError(str(exc)) from None
    try:
        # by content, but only as PNG or JPEG: an EPS named .png must not reach Ghostscript
        with open_regular(path, DataFileError, "image") as f, image_module.open(f, formats=["PNG", "JPEG"]) as img:
            img.load()
            pixels = _from_pillow(img, path)
    except (OSError, SyntaxError, ValueError, image_module.DecompressionBombError) as exc:
        if isinstance(exc, DataFileError):
            raise
        raise DataFileError(f"{path}: cannot read this image ({type(exc).__name__}: {exc}); is it corrupt?") from None
    if pixels.ndim == 3 and _png_is_gray(path):
        pixels = pixels[..., 0]  # Pillow opens 16-bit gray+alpha as RGBA with R = G = B
    return pixels


def _png_is_gray(path: Path) -> bool:
    """Whether ``path`` is a PNG of colour type 0 or 4 (gray, gray + alpha), from its IHDR."""
    with open_regular(path, DataFileError, "image") as f:
        head = f.read(26)
    return len(head) == 26 and head[:8] == png.PNG_SIGNATURE and head[12:16] == b"IHDR" and head[25] in (0, 4)


def _from_pillow(img, path) -> np.ndarray:
    """A loaded Pillow image as :mod:`.png` would decode it: (H, W) or (H, W, 3) uint8."""
    mode = img.mode
    if mode == "L":
        return np.array(img)
    if mode in ("LA", "La"):
        return np.array(img)[..., 0]
    if mode == "1":
        return np.array(img.convert("L"))
    if mode.startswith("I"):  # 16-bit gray (I;16, I;16B, or I in older Pillow): keep the high byte
        a = np.array(img)
        if a.size and (a.min() < 0 or a.max() > 0xFFFF):
            raise DataFileError(f"{path}: {mode} pixels outside 0..65535; save the image as 8 or 16-bit")
        return (a.astype(np.uint32) >> 8).astype(np.uint8)
    if mode == "F":
        raise DataFileError(f"{path}: floating-point pixels (Pillow mode F); save the image as 8 or 16-bit, or the "
                            f"array as .npy")
    if mode in ("P", "PA"):  # through RGBA: Pillow warns when a palette with transparency goes to RGB
        return np.array(img.convert("RGBA"))[..., :3]
    return np.array(img if mode == "RGB" else img.convert("RGB"))
