"""NumPy alone draws the image grids: the CLI run in a subprocess where ``import matplotlib`` fails
trains, samples, reconstructs and plots grids as PNGs written by npvae.data.png; the plots with axes
say once that they need matplotlib; "wrote ..." lines name the files written and no others.

The training run goes further: an interpreter without site-packages (``python -S``) that sees only
NumPy and npvae, as after ``pip install .`` in a fresh virtualenv.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npvae.cli import main
from npvae.data.png import read_png

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def npvae(*argv, blocker: Path, numpy_only: Path | None = None) -> subprocess.CompletedProcess:
    """``npvae ARGV`` in a fresh interpreter whose ``import matplotlib`` raises ImportError; with
    ``numpy_only``, one without site-packages that sees that folder (NumPy) and npvae only."""
    path = [str(blocker), str(REPO)] if numpy_only is None else [str(numpy_only), str(REPO)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "NPVAE_BACKEND": "numpy"}
    flags = [] if numpy_only is None else ["-S"]
    return subprocess.run([sys.executable, *flags, "-m", "npvae.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=blocker.parent, timeout=300)


@pytest.fixture(scope="module")
def blocker(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("no-matplotlib") / "site"
    (root / "matplotlib").mkdir(parents=True)
    (root / "matplotlib" / "__init__.py").write_text('raise ImportError("No module named \'matplotlib\' (blocked)")\n')
    return root


@pytest.fixture(scope="module")
def numpy_only(tmp_path_factory) -> Path:
    """A folder holding NumPy (links to the installed one) and nothing else."""
    site = Path(np.__file__).parent.parent
    root = tmp_path_factory.mktemp("numpy-only")
    for name in ("numpy", "numpy.libs"):  # numpy.libs: the wheel's bundled BLAS, where there is one
        if (site / name).exists():
            (root / name).symlink_to(site / name)
    return root


@pytest.fixture(scope="module")
def run(blocker, numpy_only):
    out = blocker.parent / "run"
    result = npvae("train", "--dataset", "demo", "--epochs", "1", "--hidden", "16", "--latent-dim", "2",
                   "--no-progress", "--out", out, blocker=blocker, numpy_only=numpy_only)
    assert result.returncode == 0, result.stderr
    return out, result


def test_the_numpy_only_interpreter_has_numpy_alone(blocker, numpy_only):
    code = ("import importlib.util as u; print([m for m in ('numpy', 'npvae', 'matplotlib', 'numba', 'torch', 'tqdm', "
            "'PIL') if u.find_spec(m)])")
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=blocker.parent,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(numpy_only), str(REPO)])})
    assert result.stdout.strip() == "['numpy', 'npvae']", result.stderr


def test_the_blocker_blocks(blocker):
    result = subprocess.run([sys.executable, "-c", "import matplotlib"], env={**os.environ, "PYTHONPATH": str(blocker)},
                            capture_output=True, text=True)
    assert result.returncode == 1 and "ImportError" in result.stderr


def grid(path: Path, cell: int = 2 * 28) -> np.ndarray:
    """The PNG's pixels, checked to be a mosaic of ``cell``-pixel images with 2-pixel gutters."""
    pixels = read_png(path)
    assert pixels.ndim == 2 and np.ptp(pixels) > 100, (path, pixels.shape)
    assert (pixels.shape[0] + 2) % (cell + 2) == 0 and (pixels.shape[1] + 2) % (cell + 2) == 0, pixels.shape
    return pixels


def test_training_writes_grids_and_says_which(run):
    out, result = run
    assert result.stdout.splitlines()[-1] == f"wrote {out}/checkpoint.npz, best.npz, log.jsonl, reconstructions.png, samples.png"
    assert "skipped" not in result.stdout + result.stderr
    assert grid(out / "samples.png").shape == (8 * 58 - 2, 8 * 58 - 2)  # 64 samples, 8 x 8
    assert grid(out / "reconstructions.png").shape == (2 * 58 - 2, 10 * 58 - 2)  # 10 inputs over their reconstructions
    assert read_png(out / "pictures" / "samples_e001.png").shape == read_png(out / "samples.png").shape


def test_sampling_with_numpy_alone(run, blocker, numpy_only):
    out, _ = run
    result = npvae("sample", out / "best.npz", "--out", "alone.png", blocker=blocker, numpy_only=numpy_only)
    assert result.returncode == 0 and result.stdout.strip() == "wrote alone.png", result.stderr
    grid(blocker.parent / "alone.png")


@pytest.mark.parametrize("argv, shape", [
    (["sample", "--n", "6", "--out", "s.png"], (2 * 58 - 2, 3 * 58 - 2)),
    (["reconstruct", "--n", "3", "--out", "r.png"], (2 * 58 - 2, 3 * 58 - 2)),
    (["plot", "interpolation", "--n", "2", "--steps", "4", "--out", "i.png"], (2 * 58 - 2, 4 * 58 - 2)),
    (["plot", "manifold", "--n", "5", "--out", "m.png"], (5 * 56, 5 * 56)),  # no gutters
])
def test_grids_from_a_checkpoint(run, blocker, argv, shape):
    out, _ = run
    result = npvae(argv[0], out / "best.npz", *argv[1:], blocker=blocker)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"wrote {argv[-1]}"
    pixels = read_png(blocker.parent / argv[-1])
    assert pixels.shape == shape and np.ptp(pixels) > 50  # blurry after one epoch, but drawn


def test_plots_with_axes_say_they_need_matplotlib_in_one_line(run, blocker):
    out, _ = run
    result = npvae("plot", out / "checkpoint.npz", "curves", "--out", "c.png", blocker=blocker)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "need matplotlib: pip install 'npvae[plot]'" in result.stderr
    assert not (blocker.parent / "c.png").exists()
    result = npvae("sample", out / "best.npz", "--out", "s.pdf", blocker=blocker)
    assert result.returncode == 2 and "ask for a .png" in result.stderr and result.stderr.count("\n") == 1


def test_grads_prints_every_table_then_says_once_the_pictures_need_matplotlib(run, blocker):
    out, _ = run
    result = npvae("grads", out / "best.npz", "--n", "8", "--draws", "10", "--dims", "1", "--out", "g", blocker=blocker)
    assert result.returncode == 0, result.stderr
    assert "split exactly into its reconstruction and KL parts" in result.stdout
    assert "variance / reparameterization variance" in result.stdout  # the second table
    assert "wrote" not in result.stdout and not (blocker.parent / "g").exists()
    assert result.stderr.count("pictures skipped") == 1 and result.stderr.count("\n") == 1


def test_wrote_lines_name_classes_for_a_cvae_and_no_pictures_when_skipped(tmp_path, capsys):
    small = ["--dataset", "demo", "--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--no-progress"]
    assert main(["train", "--model", "cvae", *small, "--out", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (f"wrote {tmp_path / 'c'}/checkpoint.npz, best.npz, log.jsonl, "
                                                        "reconstructions.png, samples.png, classes.png")
    assert main(["train", *small, "--no-pictures", "--out", str(tmp_path / "v")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'v'}/checkpoint.npz, best.npz, log.jsonl"
    assert not list((tmp_path / "v").glob("*.png"))
