"""Runs remember their data: every subcommand that reads images finds a Fashion-MNIST run's folder
without ``--data-dir``, and a folder that has moved gives one line naming where npvae looked.

One tiny model trained by the CLI on a copy of the real Fashion-MNIST files (skipped where
/work/shared/data is absent), so the remembered folder can be moved away.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from npvae.checkpoint import load_checkpoint
from npvae.cli import main
from npvae.data import sources

pytestmark = pytest.mark.slow
SHARED = Path("/work/shared/data/fashion-mnist")


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory):
    if not (SHARED / "train-labels-idx1-ubyte.gz").exists():
        pytest.skip("no Fashion-MNIST files at /work/shared/data/fashion-mnist")
    root = tmp_path_factory.mktemp("fm")
    folder = root / "fashion"
    shutil.copytree(SHARED, folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("NPVAE_DATA_DIR", raising=False)
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        mp.setattr(sources, "SYSTEM_DATA_DIRS", {})
        assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(folder), "--epochs", "1",
                     "--hidden", "8", "--latent-dim", "2", "--batch-size", "1000", "--no-progress",
                     "--no-pictures", "--out", str(root / "run")]) == 0
    return root / "run", folder


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    monkeypatch.delenv("NPVAE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", {})


def commands(run: Path, out: Path) -> dict[str, list[str]]:
    best = str(run / "best.npz")
    return {
        "evaluate": ["evaluate", best, "--n", "50"],
        "reconstruct": ["reconstruct", best, "--n", "4", "--out", str(out / "r.png")],
        "plot": ["plot", best, "latent", "--out", str(out / "latent.png")],
        "grads": ["grads", best, "--n", "8", "--draws", "4", "--dims", "1", "--out", str(out / "grads")],
    }


def test_the_checkpoints_remember_the_folder(fm_run):
    run, folder = fm_run
    for name in ("checkpoint.npz", "best.npz"):
        source = load_checkpoint(run / name)[1]["data_source"]
        assert source == {"kind": "builtin", "name": "fashion-mnist", "data_dir": str(folder.resolve())}


@pytest.mark.parametrize("command", ["evaluate", "reconstruct", "plot", "grads"])
def test_every_subcommand_finds_the_run_data_without_data_dir(fm_run, command, isolated, tmp_path, capsys):
    run, folder = fm_run
    assert main(commands(run, tmp_path)[command]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" or "error" not in captured.err
    if command == "evaluate":
        # evaluate reads the test split alone (issue 25: t10k files suffice)
        assert f"Fashion-MNIST test split (10,000 images) from {folder.resolve()}" in captured.out


def test_a_moved_folder_is_one_line_naming_where_npvae_looked(fm_run, isolated, tmp_path, capsys):
    run, folder = fm_run
    moved = folder.with_name("moved")
    folder.rename(moved)
    try:
        for command, argv in commands(run, tmp_path).items():
            assert main(argv) == 2, command
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            assert str(folder.resolve()) in err and "--data-dir DIR" in err and "Fashion-MNIST" in err, err
        assert main([*commands(run, tmp_path)["evaluate"], "--data-dir", str(moved)]) == 0  # pointing elsewhere works
        assert main(["sample", str(run / "best.npz"), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0  # no data needed
    finally:
        moved.rename(folder)


def test_a_moved_data_file_is_one_line_too(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "mine.npz"
    np.savez(data, x=rng.integers(0, 256, (300, 6, 6), dtype=np.uint8), y=rng.integers(0, 3, 300))
    assert main(["train", "--data", str(data), "--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--no-progress",
                 "--no-pictures", "--out", str(tmp_path / "run")]) == 0
    best = str(tmp_path / "run" / "best.npz")
    assert main(["evaluate", best]) == 0  # remembered
    moved = data.rename(tmp_path / "elsewhere.npz")
    capsys.readouterr()
    assert main(["evaluate", best]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(data) in err and "pass --data PATH to point elsewhere" in err, err
    assert main(["evaluate", best, "--data", str(moved)]) == 0
