"""Sizes bounded before allocating (issue 24): one memory estimate from shapes, refused in one line that names
the bytes, what asked for them and the smaller setting, for training, evaluation, sampling and plotting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from npvae import memory
from npvae.checkpoint import load_checkpoint, save_checkpoint
from npvae.cli import main
from npvae.data.png import write_png
from npvae.layers import Dense, Flatten, MaxPool2d, Reshape, Sequential, Upsample2d
from npvae.models import VAE, save_model

LIMIT = "4G"  # the tests' machine: refusals do not depend on the memory of the one running them


@pytest.fixture(autouse=True)
def four_gib(monkeypatch):
    monkeypatch.setenv(memory.ENV_LIMIT, LIMIT)



def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_limit_follows_the_environment_or_the_machine(monkeypatch):
    assert memory.memory_limit()[0] == 4 << 30
    monkeypatch.setenv(memory.ENV_LIMIT, "1536M")
    assert memory.memory_limit()[0] == 1536 << 20
    monkeypatch.setenv(memory.ENV_LIMIT, "lots")
    with pytest.raises(memory.MemoryRefused, match="expected a size in bytes"):
        memory.memory_limit()
    monkeypatch.delenv(memory.ENV_LIMIT)
    available, where = memory.memory_limit()
    assert available is None or available > 0 and "available" in where
    assert memory.human_bytes(34_359_738_368) == "32.0 GiB" and memory.human_bytes(5) == "5 bytes"


def test_huge_hidden_layers_are_refused_before_the_parameters_exist(small, tmp_path, capsys):
    # on main: a 32 GiB MemoryError traceback
    assert main(["train", "--data", str(small), "--hidden", "65536", "65536", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    err = error_line(capsys)
    assert "parameters" in err and "bytes" in err and "GiB" in err and "--hidden" in err
    assert not (tmp_path / "r" / "checkpoint.npz").exists()


def test_large_images_into_a_dense_model_are_refused(tmp_path, capsys):
    # on main: two 80 KB 9000x9000 PNGs -> "Unable to allocate 242 GiB" (here 3000x3000: 7.2e9 parameters)
    folder = tmp_path / "pages"
    for name in "ab":
        write_png(folder / f"{name}.png", np.zeros((3000, 3000), np.uint8))
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "parameters" in error_line(capsys)


@pytest.mark.slow
def test_conv_pages_too_large_for_one_batch_say_so(tmp_path, capsys):
    # on main: conv-doc-dae on three 4000x4000 pages -> 7.6 GiB for one buffer
    folder = tmp_path / "pages"
    for name in "abc":
        write_png(folder / f"{name}.png", np.zeros((2000, 2000), np.uint8))
    assert main(["train", "--model", "conv-doc-dae", "--data", str(folder), "--target", str(folder),
                 "--out", str(tmp_path / "r"), "--no-progress", "--no-pictures"]) == 2
    err = error_line(capsys)
    assert "per example of shape 2000x2000" in err and "--batch-size" in err and "tiles" in err


def test_k_times_batch_from_a_config_file_is_refused_naming_it(small, tmp_path, capsys):
    # on main: {"objective": "iwae", "k": 100000000} via --config -> a 954 GiB traceback
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"objective": "iwae", "k": 100_000_000}))
    assert main(["train", "--data", str(small), "--config", str(config), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    err = error_line(capsys)
    assert f"--config {config}" in err and "k 100000000" in err and "lower k" in err


def test_k_times_batch_from_a_resumed_checkpoint_is_refused_naming_it(small, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--data", str(small), "--hidden", "8", "--latent-dim", "2", "--epochs", "1", "--out",
                 str(out), "--no-progress", "--no-pictures"]) == 0
    arrays, meta = load_checkpoint(out / "checkpoint.npz")
    meta["train_config"].update(objective="iwae", k=100_000_000, epochs=2)
    meta.pop("format_version")
    save_checkpoint(out / "checkpoint.npz", arrays, meta)
    capsys.readouterr()
    assert main(["train", "--resume", "--data", str(small), "--out", str(out), "--no-progress"]) == 2
    err = error_line(capsys)
    assert str(out / "checkpoint.npz") in err and "samples per step" in err


def _upsampler(path: Path) -> Path:
    """Eight parameters; its decoder blows one value up to 100000 x 100000 and pools it back."""
    model = VAE(encoder=Sequential(Flatten(), Dense(1, 1)),
                decoder=Sequential(Dense(1, 1), Reshape((1, 1, 1)), Upsample2d(100_000), MaxPool2d(100_000),
                                   Reshape((1,))),
                input_shape=(1,), latent_dim=1)
    return save_model(model, path)


def test_a_small_checkpoint_with_a_huge_upsampling_is_refused_on_sample(tmp_path, capsys):
    # on main: 6 parameters and Upsample2d(100000) -> 37 GiB on `sample --n 1`
    path = _upsampler(tmp_path / "up.npz")
    assert main(["sample", str(path), "--n", "1", "--out", str(tmp_path / "s.png")]) == 2
    err = error_line(capsys)
    assert "decoding 1 samples" in err and str(path) in err and "lower --n" in err
    assert not (tmp_path / "s.png").exists()
    assert main(["plot", str(path), "samples", "--n", "1", "--out", str(tmp_path / "p.png")]) == 2
    assert "drawing samples (1 images)" in error_line(capsys)


def test_the_estimate_is_near_what_a_conv_training_step_allocates():
    import tracemalloc

    from npvae.models import ConvDenoisingAutoencoder

    model = ConvDenoisingAutoencoder(input_shape=(28, 28))
    x = np.random.default_rng(0).random((16, 28, 28)).astype(np.float32)
    tracemalloc.start()
    model.loss_and_grads(x, rng=np.random.default_rng(0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    estimate = 16 * memory.per_example_bytes(model)
    assert 0.5 * peak < estimate < 2 * peak
