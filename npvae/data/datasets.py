"""The :class:`Dataset` container and the built-in datasets: the shipped demo digits, MNIST and
Fashion-MNIST (found or downloaded by :mod:`npvae.data.sources`).

- :class:`Dataset` holds train / validation / test arrays of any data: ``x`` of shape
  ``(N, *sample_shape)`` (uint8 pixels or floats), optional integer labels ``y`` and optional
  paired targets (input -> target training, e.g. noisy scan -> clean scan).
  :meth:`Dataset.from_arrays` builds one from arrays, splitting off a validation set.
- :func:`load_dataset` is the entry point for the built-in data: ``"mnist"``,
  ``"fashion-mnist"``, ``"demo"``, or ``None`` for "full MNIST if available, else the demo
  digits". A user's own files go through :func:`npvae.data.load_path`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources

import numpy as np

from . import sources

__all__ = ["Dataset", "DEMO", "DEMO_SIZE", "DEFAULT_DATASET", "builtin_datasets", "dataset_title", "load_demo",
           "load_dataset"]

_PARTS = ("train", "val", "test")


_MAX_SPARSE_CLASSES = 1024  # up to here, labels may skip values freely (a subset of ImageNet's 1000 classes)


def _inferred_classes(needed: int, labels: list[np.ndarray], top: dict) -> int:
    """The class count of labels 0..C-1: their largest + 1, refused when a label lies far outside the distinct
    labels present (one label 2**40 among ten would make a conditional model of 2**40 classes)."""
    distinct = len(np.unique(np.concatenate([y.reshape(-1) for y in labels])))
    if needed > max(2 * distinct, _MAX_SPARSE_CLASSES):
        part = max(top, key=top.get)
        raise ValueError(f"{part}_y holds label {top[part]} but only {distinct} distinct labels: labels must be "
                         f"0..C-1 for C classes; renumber them (np.unique(y, return_inverse=True)[1]) or pass "
                         f"num_classes")
    return needed


@dataclass(repr=False)
class Dataset:
    """Train / validation / test arrays of any data, ready for training.

    Every ``*_x`` has shape ``(N_part, *sample_shape)`` with one ``sample_shape`` for all three
    parts, e.g. ``(784,)`` for MNIST rows, ``(20, 20)`` or ``(H, W, 3)`` for images. Its dtype is
    ``uint8`` (pixels 0..255, scaled by :func:`npvae.data.to_model_range`) or any other numeric
    dtype holding values already on the model's scale (floats, which must be finite; bools;
    integers). Labels are all present or all None; so are the paired targets. The constructor
    checks all of this and raises one line naming the array for the first problem found.
    A part may be empty (e.g. ``val_size=0``); :meth:`from_arrays` makes both splits non-empty.
    """

    name: str                                # "mnist", "fashion-mnist", "demo", a file stem, "arrays"
    train_x: np.ndarray                      # (N_train, *S) uint8 or float; S = sample_shape
    train_y: np.ndarray | None               # (N_train,) integer labels >= 0, or None
    val_x: np.ndarray                        # (N_val, *S): held out from the training data
    val_y: np.ndarray | None                 # (N_val,) or None
    test_x: np.ndarray                       # (N_test, *S): without a test split, the validation arrays
    test_y: np.ndarray | None                # (N_test,) or None
    num_classes: int | None = None           # labels are 0..num_classes-1; 0 without labels; None: inferred
    description: str = ""                    # one human line: which data, how split, from where
    is_demo: bool = False                    # True for the shipped 5,000-digit subset
    train_target: np.ndarray | None = None   # (N_train, *T) paired targets (uint8 or float), or None
    val_target: np.ndarray | None = None     # (N_val, *T) or None
    test_target: np.ndarray | None = None    # (N_test, *T) or None
    source: dict | None = None               # JSON-able: where the data came from (kept in checkpoints)

    def __post_init__(self):
        xs = {part: _check_examples(getattr(self, f"{part}_x"), f"{part}_x") for part in _PARTS}
        for part in _PARTS:
            setattr(self, f"{part}_x", xs[part])
        _check_same_trailing_shape(xs, "x", "sample shape")
        self._check_optional("y", xs, _check_labels)
        self._check_optional("target", xs, _check_examples)
        if self.is_paired:
            _check_same_trailing_shape({p: getattr(self, f"{p}_target") for p in _PARTS}, "target", "target shape")
        self.num_classes = self._check_num_classes()
        if self.source is not None:
            if not isinstance(self.source, dict):
                raise TypeError(f"expected source a dict (e.g. {{'kind': 'arrays'}}), got {type(self.source).__name__}")
            try:
                json.dumps(self.source)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"expected source a JSON-able dict (it is stored in checkpoints): {exc}") from None

    def _check_optional(self, field: str, xs: dict, check) -> None:
        """``{part}_{field}``: all None, or all arrays with one row per example of ``{part}_x``."""
        given = [getattr(self, f"{part}_{field}") is not None for part in _PARTS]
        if any(given) and not all(given):
            have = ", ".join(f"{p}_{field}" for p, g in zip(_PARTS, given) if g)
            lack = ", ".join(f"{p}_{field}" for p, g in zip(_PARTS, given) if not g)
            raise ValueError(f"{have} given but {lack} missing: give {field} for every split or for none")
        if all(given):
            for part in _PARTS:
                setattr(self, f"{part}_{field}", check(getattr(self, f"{part}_{field}"), f"{part}_{field}",
                                                       xs[part].shape[0]))

    def _check_num_classes(self) -> int:
        num_classes = self.num_classes
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
                                        or num_classes < 0):
            raise ValueError(f"expected num_classes a non-negative integer or None, got {num_classes!r}")
        if not self.has_labels:
            if num_classes:
                raise ValueError(f"num_classes={num_classes} but the dataset has no labels (train_y is None); "
                                 f"pass num_classes=0 or None, or give labels")
            return 0
        top = {part: int(y.max()) for part in _PARTS if (y := getattr(self, f"{part}_y")).size}
        needed = max(top.values(), default=-1) + 1
        if num_classes is None:
            return _inferred_classes(needed, [getattr(self, f"{part}_y") for part in _PARTS], top)
        if num_classes < needed:
            part = max(top, key=top.get)
            raise ValueError(f"{part}_y holds label {top[part]} but num_classes={num_classes}: labels must be "
                             f"0..num_classes-1")
        return int(num_classes)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(784,)``, ``(20, 20)`` or ``(H, W, 3)``."""
        return self.train_x.shape[1:]

    @property
    def target_shape(self) -> tuple[int, ...] | None:
        """Shape of one paired target, or None when the dataset is not paired."""
        return None if self.train_target is None else self.train_target.shape[1:]

    @property
    def has_labels(self) -> bool:
        """Whether the examples carry class labels ``y``."""
        return self.train_y is not None

    @property
    def is_paired(self) -> bool:
        """Whether every input has a paired target (input -> target training)."""
        return self.train_target is not None

    @classmethod
    def from_arrays(cls, x, y=None, target=None, *, val_x=None, val_y=None, val_target=None,
                    val_fraction: float = 0.1, seed: int = 0, name: str = "arrays",
                    description: str | None = None, source: dict | None = None) -> "Dataset":
        """A dataset from arrays, with a validation set split off unless one is given.

        Without ``val_x``, a seeded ``val_fraction`` of the examples is held out: stratified by
        ``y`` when there are labels (``round(val_fraction * n_c)`` of class c, at most
        ``n_c - 1``, at least one example in all; both splits in a seeded shuffled order so that
        any prefix mixes the classes, as for the demo digits), else a seeded random subset of
        ``round(val_fraction * N)`` (between 1 and N - 1) with both splits in the original order.
        There is no separate test split: ``test_*`` are the validation arrays.

        Parameters
        ----------
        x : (N, ...) array_like
            uint8 pixels, or numbers on the model's scale (floats must be finite). N >= 2 when
            splitting.
        y : (N,) integer array_like, optional
            Class labels >= 0.
        target : (N, ...) array_like, optional
            Paired targets, one per example of x (any trailing shape, uint8 or float).
        val_x, val_y, val_target : array_like, optional
            An explicit validation set (then ``val_fraction`` is ignored); ``val_y`` and
            ``val_target`` go with it exactly when ``y`` and ``target`` are given.
        val_fraction : float
            In (0, 1).
        seed : int
            Seeds the split.
        name : str
        description : str, optional
            Default: a line with the split sizes and the shapes.
        source : dict, optional
            JSON-able provenance; default ``{"kind": "arrays"}``.

        Returns
        -------
        dataset : Dataset

        Raises
        ------
        TypeError
            A non-numeric array, or non-integer labels.
        ValueError
            Wrong shapes, NaN/inf, negative labels, too few examples, a bad ``val_fraction``.
            One line naming the array and the shape, dtype or index at fault.
        """
        x = _check_examples(x, "x")
        n = x.shape[0]
        y = None if y is None else _check_labels(y, "y", n)
        target = None if target is None else _check_examples(target, "target", n)
        if val_x is None:
            for given, what in ((val_y, "val_y"), (val_target, "val_target")):
                if given is not None:
                    raise ValueError(f"{what} given without val_x: pass val_x too, or leave {what} out to split "
                                     f"the validation set off x")
            if n < 2:
                raise ValueError(f"expected x with at least 2 examples to split off a validation set, got "
                                 f"shape {x.shape}; pass more data or an explicit val_x")
            if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.floating)) \
                    or not 0 < val_fraction < 1:
                raise ValueError(f"expected val_fraction in (0, 1), got {val_fraction!r}")
            if y is not None:
                train_idx, val_idx = _stratified_split(y, float(val_fraction), seed, strict=False)
                how = f"stratified by label, seed {seed}"
            else:
                train_idx, val_idx = _random_split(n, float(val_fraction), seed)
                how = f"seed {seed}"
            take = (lambda a, idx: None if a is None else a[idx])
            train = (x[train_idx], take(y, train_idx), take(target, train_idx))
            val = (x[val_idx], take(y, val_idx), take(target, val_idx))
        else:
            how = "validation given"
            val_x = _check_examples(val_x, "val_x")
            for part, value, val_value in (("y", y, val_y), ("target", target, val_target)):
                if (value is None) != (val_value is None):
                    have, lack = (part, f"val_{part}") if value is not None else (f"val_{part}", part)
                    raise ValueError(f"{have} given but {lack} missing: give both or neither")
            val = (val_x, None if val_y is None else _check_labels(val_y, "val_y", val_x.shape[0]),
                   None if val_target is None else _check_examples(val_target, "val_target", val_x.shape[0]))
            train = (x, y, target)
            for part, arr in (("x", train[0]), ("val_x", val[0])):
                if arr.shape[0] == 0:
                    raise ValueError(f"expected {part} with at least 1 example, got shape {arr.shape}")
        if description is None:
            description = (f"{name}: {train[0].shape[0]:,} train / {val[0].shape[0]:,} validation ({how}; test = "
                           f"validation), {_summary(x, y, target)}")
        return cls(name, train[0], train[1], val[0], val[1], val[0], val[1], None, description, False,
                   train[2], val[2], val[2], {"kind": "arrays"} if source is None else source)

    def __repr__(self) -> str:
        extra = ("" if self.has_labels else ", labels=None") + \
            (f", target={self.target_shape}" if self.is_paired else "")
        return (f"Dataset(name={self.name!r}, train={self.train_x.shape}, val={self.val_x.shape}, "
                f"test={self.test_x.shape}, is_demo={self.is_demo}{extra})")


def _summary(x: np.ndarray, y: np.ndarray | None, target: np.ndarray | None) -> str:
    """E.g. ``x (N, 20, 20) uint8, 10 classes, target (N, 20, 20) float32``."""
    def shape(a):
        return "(N, " + ", ".join(map(str, a.shape[1:])) + ")"
    parts = [f"x {shape(x)} {x.dtype}"]
    if y is not None:
        parts.append(f"{np.unique(y).size} classes" if y.size else "no labels in use")
    if target is not None:
        parts.append(f"target {shape(target)} {target.dtype}")
    return ", ".join(parts)


def _check_examples(a, name: str, n: int | None = None) -> np.ndarray:
    """``a`` as a numeric array of shape ``(N, ...)`` (``N == n`` if given) with finite floats."""
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"expected {name} a numeric array (uint8 pixels or floats), got dtype {a.dtype}")
    if a.ndim < 2:
        hint = f"; for N single numbers pass {name}.reshape(-1, 1)" if a.ndim == 1 else ""
        raise ValueError(f"expected {name} of shape (N, ...), one example per row, e.g. (N, D) or (N, H, W), "
                         f"got shape {a.shape}{hint}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"expected {name} with {n} rows, one per example, got shape {a.shape}")
    if a.dtype.kind == "f" and a.size:
        # min/max propagate NaN and show inf: two reductions, no mask unless something is wrong.
        lo, hi = a.min(), a.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
            raise ValueError(f"{name} contains {a[where]} at index {where}; remove or replace non-finite values")
    return a


def _check_labels(y, name: str, n: int) -> np.ndarray:
    """``y`` as an integer array of shape ``(n,)`` with labels >= 0."""
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        hint = f"; cast whole-number labels with {name}.astype(int)" if y.dtype.kind in "fb" else ""
        raise TypeError(f"expected {name} integer class labels, got dtype {y.dtype}{hint}")
    if y.shape != (n,):
        raise ValueError(f"expected {name} of shape ({n},), one label per example, got {y.shape}")
    if y.size and y.min() < 0:
        i = int(np.argmax(y < 0))
        raise ValueError(f"expected {name} labels >= 0, got {name}[{i}] = {y[i]}")
    return y


def _check_same_trailing_shape(arrays: dict, field: str, what: str) -> None:
    shape = arrays["train"].shape[1:]
    for part in ("val", "test"):
        if arrays[part].shape[1:] != shape:
            raise ValueError(f"expected {part}_{field} with the {what} of train_{field} {shape}, got shape "
                             f"{arrays[part].shape}")


def _random_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), each sorted: a seeded random ``round(val_fraction * n)`` in [1, n-1] held out."""
    k = min(max(int(math.floor(val_fraction * n + 0.5)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int,
                      strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``round(val_fraction * n_c)`` of each class c in validation, both in
    a seeded shuffled order so that any prefix mixes the classes.

    ``strict`` (the demo digits) refuses a fraction that leaves a class out of either split.
    Otherwise a class keeps at least one example in training (a class of one is not in
    validation) and, should every class round to zero, the largest gives one to validation.
    """
    rng = np.random.default_rng(seed)
    classes = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    ks = [int(math.floor(val_fraction * idx.size + 0.5)) for idx in classes]
    if strict:
        for c, idx, k in zip(np.unique(labels), classes, ks):
            if not 0 < k < idx.size:
                raise ValueError(f"val_fraction={val_fraction} puts {k} of the {idx.size} examples of class {c} "
                                 f"in validation; every class needs at least one in each split")
    else:
        ks = [min(k, idx.size - 1) for idx, k in zip(classes, ks)]
        if sum(ks) == 0:
            largest = max(range(len(classes)), key=lambda i: classes[i].size)
            if classes[largest].size < 2:
                raise ValueError(f"every class has a single example ({len(classes)} examples, all labels "
                                 f"distinct): nothing can be held out for validation; pass val_x and val_y")
            ks[largest] = 1
    val_parts = [idx[:k] for idx, k in zip(classes, ks)]
    train_parts = [idx[k:] for idx, k in zip(classes, ks)]
    return rng.permutation(np.concatenate(train_parts)), rng.permutation(np.concatenate(val_parts))


DEMO = "demo"  # the shipped digits' name, beside the downloadable datasets of npvae.data.sources.DATASETS
DEMO_SIZE = 5000  # digits in mnist_demo.npz, 500 per class
DEFAULT_DATASET = "mnist"  # load_dataset(None): this one when on disk or downloadable, else the demo digits


def builtin_datasets() -> tuple[str, ...]:
    """The names :func:`load_dataset` takes: every dataset of :data:`npvae.data.DATASETS`, then the demo."""
    return (*sources.DATASETS, DEMO)


def dataset_title(name) -> str:
    """A built-in dataset's name in words ("Fashion-MNIST", "the demo digits"); other names as they are."""
    if name == DEMO:
        return "the demo digits"
    return sources.DATASETS[name].title if name in sources.DATASETS else str(name)


def _read_demo() -> tuple[np.ndarray, np.ndarray]:
    ref = resources.files("npvae") / "_resources" / "mnist_demo.npz"
    with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"]
    if images.shape != (DEMO_SIZE, 784) or images.dtype != np.uint8 or labels.shape != (DEMO_SIZE,):
        raise ValueError(f"{ref}: expected images (5000, 784) uint8 and labels (5000,), got "
                         f"{images.shape} {images.dtype} and {labels.shape}; reinstall npvae or rerun "
                         f"scripts/make_demo_data.py")
    return images, labels.astype(np.uint8, copy=False)


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
    return Dataset(DEMO, images[train_idx], labels[train_idx], val_x, val_y, val_x, val_y,
                   num_classes=10, description=description, is_demo=True,
                   source={"kind": "builtin", "name": DEMO, "data_dir": None})


def load_dataset(name: str | None = None, data_dir=None, val_size: int | None = None, seed: int = 0,
                 download: bool = True, splits: str | tuple[str, ...] = ("train", "test")) -> Dataset:
    """The single entry point for training data.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist", "demo"} or None
        None means full MNIST if it is on disk or can be downloaded (one quick connection test
        first, so an offline machine does not wait out retries), else the demo digits; the
        returned ``description`` says which was used and why.
    data_dir : str or os.PathLike, optional
        Searched first for the files (see :func:`npvae.data.find_dataset_dir`), and the
        download destination.
    val_size : int, optional
        Validation examples held out of the training split: default 5,000 for MNIST and
        Fashion-MNIST (a seeded random subset; the official test split stays the test set).
        For ``"demo"``, held out stratified per class (default 500, 50 per class); ignored when
        ``name=None`` falls back to the demo.
    seed : int
        Seeds the validation split.
    download : bool
        Allow downloading missing files.
    splits : "test" or ("train", "test")
        ``"test"``: only the official test split of MNIST or Fashion-MNIST is read (and needed on
        disk); the training and validation parts are empty. To score a model on the test set with
        only the t10k files at hand. The demo and ``name=None`` always load everything.

    Returns
    -------
    dataset : Dataset
        ``source`` is ``{"kind": "builtin", "name": NAME, "data_dir": FOLDER}``, FOLDER being
        the absolute folder the training files were read from (None for the demo).
    """
    if name is None:
        return _load_default(data_dir, val_size, seed, download)
    key = name.lower().replace("_", "-")
    if key == DEMO:
        if val_size is None:
            return load_demo(seed=seed)
        return load_demo(val_fraction=_check_val_size(val_size, DEMO_SIZE) / DEMO_SIZE, seed=seed)
    spec = sources._spec(key)
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    if set(splits) not in ({"test"}, {"train", "test"}):
        raise ValueError(f"expected splits 'test' or ('train', 'test'), got {splits!r}")
    test_x, test_y, test_dir = sources._load_split(spec, "test", data_dir, download, verify=True)
    if "train" not in splits:
        empty_x, empty_y = test_x[:0], test_y[:0]
        return Dataset(spec.name, empty_x, empty_y, empty_x, empty_y, test_x, test_y, num_classes=10,
                       description=f"{spec.title} test split ({test_x.shape[0]:,} images) from {test_dir}",
                       source={"kind": "builtin", "name": spec.name, "data_dir": str(test_dir.resolve())})
    train_x, train_y, train_dir = sources._load_split(spec, "train", data_dir, download, verify=True)
    n_val = _check_val_size(5000 if val_size is None else val_size, train_x.shape[0])
    perm = np.random.default_rng(seed).permutation(train_x.shape[0])
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    where = str(train_dir) if train_dir == test_dir else f"{train_dir} (train) and {test_dir} (test)"
    description = (f"{spec.title} ({train_idx.size:,} train / {n_val:,} validation / {test_x.shape[0]:,} test) "
                   f"from {where}")
    return Dataset(spec.name, train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx],
                   test_x, test_y, num_classes=10, description=description, is_demo=False,
                   source={"kind": "builtin", "name": spec.name, "data_dir": str(train_dir.resolve())})


def _check_val_size(val_size, n: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or not 0 <= val_size < n:
        raise ValueError(f"expected val_size an integer in [0, {n}), got {val_size!r}")
    return int(val_size)


def _load_default(data_dir, val_size, seed: int, allow_download: bool) -> Dataset:
    spec = sources._spec(DEFAULT_DATASET)
    if sources.find_dataset_dir(DEFAULT_DATASET, data_dir) is not None:
        return load_dataset(DEFAULT_DATASET, data_dir, val_size, seed, download=False)
    if not allow_download:
        reason = "full MNIST not found on disk and downloads are disabled"
    elif not sources._reachable(spec.mirrors):
        reason = "full MNIST not found on disk and the machine seems to be offline"
    else:
        try:
            return load_dataset(DEFAULT_DATASET, data_dir, val_size, seed, download=True)
        except sources.DownloadError as exc:
            reason = f"full MNIST not found on disk and the download failed: {str(exc).splitlines()[0]}"
    demo = load_demo(seed=seed)
    demo.description += f" (using it because {reason})"
    return demo
