"""Data: the built-in datasets (MNIST, Fashion-MNIST, the shipped demo digits), a user's own
files, preprocessing and seeded batching. NumPy and the standard library only (downloads go
through :mod:`urllib`; Pillow is used for images when installed).

One concern per module:

- :mod:`~npvae.data.idx`: :func:`read_idx`, the IDX file format, read defensively.
- :mod:`~npvae.data.sources`: where MNIST and Fashion-MNIST come from: the specs and checksums
  (:data:`DATASETS`), the folders searched (:func:`find_dataset_dir`, :func:`cache_dir`), the
  verified :func:`download`, and :func:`load_mnist_like` for one split.
- :mod:`~npvae.data.datasets`: the :class:`Dataset` container (any data; labels and paired
  targets optional; :meth:`Dataset.from_arrays`), :func:`load_demo` and :func:`load_dataset`,
  the entry point for the built-in data.
- :mod:`~npvae.data.files`: :func:`load_path`, a user's ``.npy`` / ``.npz`` file or folder of
  images; :mod:`~npvae.data.png` decodes PNGs when Pillow is missing.
- :mod:`~npvae.data.preprocess`: :func:`to_model_range` (and :func:`to_float`),
  :func:`binarize_static`, :func:`binarize_dynamic`, :func:`epoch_permutation`,
  :func:`batch_indices`.

Everything public is importable from here: ``from npvae import data; data.load_dataset("demo")``.
"""

from .datasets import DEFAULT_DATASET, DEMO, DEMO_SIZE, Dataset, builtin_datasets, dataset_title, load_dataset, load_demo
from .files import IMAGE_SUFFIXES, DataFileError, load_path
from .idx import IDX_DTYPES, MAX_IDX_BYTES, IDXFormatError, read_idx
from .png import PNGFormatError, read_png, write_png
from .preprocess import (batch_indices, binarize_dynamic, binarize_static, epoch_permutation, to_float,
                         to_model_range)
from .sources import (DATASETS, SPLITS, SYSTEM_DATA_DIRS, DatasetSpec, DownloadError, IDXFile, cache_dir, download,
                      find_dataset_dir, load_mnist_like)

__all__ = [
    "IDXFormatError", "DownloadError", "DataFileError", "PNGFormatError", "IDXFile", "DatasetSpec", "DATASETS",
    "Dataset", "read_idx", "read_png", "write_png", "cache_dir", "find_dataset_dir", "download", "load_mnist_like", "load_demo",
    "load_dataset", "builtin_datasets", "dataset_title", "load_path", "to_model_range", "to_float", "binarize_static", "binarize_dynamic",
    "epoch_permutation", "batch_indices",
    # constants callers read (and tests patch in the module that owns them)
    "DEMO", "DEMO_SIZE", "DEFAULT_DATASET", "IMAGE_SUFFIXES", "IDX_DTYPES", "MAX_IDX_BYTES", "SPLITS", "SYSTEM_DATA_DIRS",
]
