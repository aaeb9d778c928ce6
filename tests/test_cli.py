"""The ``npvae`` command line end to end, on the demo digits (small models, one or two epochs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from npvae.checkpoint import load_checkpoint
from npvae.cli import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"

SMALL = ["--dataset", "demo", "--hidden", "64", "--latent-dim", "4", "--no-progress"]


def is_png(path) -> bool:
    return Path(path).read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cvae")
    assert main(["train", "--model", "cvae", *SMALL, "--epochs", "1", "--out", str(out)]) == 0
    return out


def test_train_writes_checkpoints_log_and_pictures(vae_run, capsys):
    for name in ("checkpoint.npz", "best.npz", "log.jsonl", "reconstructions.png", "samples.png",
                 "pictures/samples_e002.png", "pictures/reconstructions_e001.png"):
        assert (vae_run / name).exists(), name
    assert is_png(vae_run / "samples.png")
    records = [json.loads(line) for line in (vae_run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2]


def test_evaluate_prints_the_elbo_and_its_parts(vae_run, capsys):
    assert main(["evaluate", str(vae_run / "checkpoint.npz"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dataset"] == "demo" and result["examples"] == 500
    assert result["paired"] is False and "rmse_input_target" not in result  # no targets: scored against x
    assert result["loss_name"] == "negative ELBO" and result["unit"] == "nats"
    assert result["loss"] == pytest.approx(result["recon"] + result["reg"])
    assert 50 < result["loss"] < 400


def test_sample_and_reconstruct_write_pngs(vae_run, tmp_path):
    assert main(["sample", str(vae_run / "best.npz"), "--n", "16", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["reconstruct", str(vae_run / "best.npz"), "--out", str(tmp_path / "r.png")]) == 0
    assert is_png(tmp_path / "s.png") and is_png(tmp_path / "r.png")


def test_cvae_samples_the_label_asked_for(cvae_run, tmp_path, capsys):
    assert (cvae_run / "classes.png").exists()
    assert main(["sample", str(cvae_run / "checkpoint.npz"), "--label", "7", "--out", str(tmp_path / "7.png")]) == 0
    assert is_png(tmp_path / "7.png")
    assert main(["sample", str(cvae_run / "checkpoint.npz"), "--label", "10", "--out", str(tmp_path / "x.png")]) == 2
    assert "[0, 10)" in capsys.readouterr().err
    assert main(["evaluate", str(cvae_run / "checkpoint.npz")]) == 0
    assert "negative conditional ELBO" in capsys.readouterr().out


def test_plot_classes_draws_one_row_per_class(cvae_run, vae_run, tmp_path, capsys):
    assert main(["plot", str(cvae_run / "best.npz"), "classes", "--n", "4", "--out", str(tmp_path / "c.png")]) == 0
    assert is_png(tmp_path / "c.png")
    assert main(["plot", str(vae_run / "best.npz"), "classes", "--out", str(tmp_path / "x.png")]) == 2
    assert "conditional model" in capsys.readouterr().err


def test_label_on_an_unconditional_model_is_a_clear_error(vae_run, tmp_path, capsys):
    assert main(["sample", str(vae_run / "checkpoint.npz"), "--label", "3", "--out", str(tmp_path / "x.png")]) == 2
    assert "conditional model" in capsys.readouterr().err


def test_each_model_kind_trains_from_the_cli(tmp_path):
    for kind in ("ae", "dae", "poor"):
        assert main(["train", "--model", kind, *SMALL, "--epochs", "1", "--no-pictures", "--out", str(tmp_path / kind)]) == 0
        _, meta = load_checkpoint(tmp_path / kind / "checkpoint.npz")
        assert meta["model"] == kind


def test_k_sample_objectives_train_resume_and_evaluate_from_the_cli(tmp_path, capsys):
    out = tmp_path / "iwae"
    common = ["train", *SMALL, "--no-pictures", "--binarize", "dynamic", "--out", str(out)]
    assert main([*common, "--epochs", "1", "--objective", "iwae", "--k", "3", "--estimator", "dreg"]) == 0
    assert "objective: negative IWAE bound, k = 3, doubly reparameterized (DReG) gradient" in capsys.readouterr().out
    assert main([*common, "--epochs", "2", "--resume"]) == 0  # the run's own objective, not the default
    captured = capsys.readouterr()
    assert "objective: negative IWAE bound, k = 3, doubly reparameterized (DReG) gradient" in captured.out
    _, meta = load_checkpoint(out / "checkpoint.npz")
    assert (meta["epoch"], meta["train_config"]["objective"], meta["train_config"]["k"],
            meta["train_config"]["estimator"]) == (2, "iwae", 3, "dreg")
    assert main(["evaluate", str(out / "best.npz"), "--n", "20", "--iw-samples", "10", "--json"]) == 0
    text = capsys.readouterr().out
    assert "trained on: negative IWAE bound, k = 3, doubly reparameterized (DReG) gradient" in text
    assert json.loads(text.strip().splitlines()[-1])["objective"] == {"name": "iwae", "k": 3, "estimator": "dreg"}
    for bad, message in ((["--objective", "elbo", "--k", "5", "--estimator", "dreg"], "dreg is IWAE's estimator"),
                         (["--objective", "iwae", "--k", "2", "--beta", "2"], "beta = 2.0"),
                         (["--objective", "iwae", "--k", "2", "--model", "ae"], "needs a VAE with the prior")):
        assert main(["train", *SMALL, "--epochs", "1", "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    assert main(["evaluate", str(garbage)]) == 2
    assert "garbage.npz" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.npz")]) == 2
    assert main(["train", *SMALL, "--epochs", "1", "--batch-size", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--batch-size: expected a whole number from 1" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_uninterrupted_result(tmp_path):
    """A real SIGINT to a real training process, then --resume, against a straight run."""
    # Enough epochs that the interrupt, sent once epoch 1 is logged, lands during training even
    # on a loaded machine.
    args = ["train", *SMALL, "--epochs", "8", "--batch-size", "32", "--no-pictures", "--seed", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-m", "npvae.cli", *args, "--out", str(straight)], check=True, env=env,
                   capture_output=True, timeout=300)

    resumed = tmp_path / "resumed"
    # A shell without job control starts background jobs with SIGINT ignored, and children inherit
    # that; give the trainer the default disposition a terminal user has.
    proc = subprocess.Popen([sys.executable, "-m", "npvae.cli", *args, "--out", str(resumed)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:  # interrupt during epoch 2, after epoch 1's checkpoint exists
        deadline = time.monotonic() + 240
        while not (resumed / "log.jsonl").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be interrupted"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in out and "--resume" in out
    _, meta = load_checkpoint(resumed / "checkpoint.npz")
    assert meta["epoch"] >= 1

    subprocess.run([sys.executable, "-m", "npvae.cli", *args, "--out", str(resumed), "--resume"], check=True,
                   env=env, capture_output=True, timeout=300)
    a, _ = load_checkpoint(straight / "checkpoint.npz")
    b, _ = load_checkpoint(resumed / "checkpoint.npz")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)



def test_keras_optimizer_settings_train_from_flags_and_show_in_info(tmp_path, capsys):
    out = tmp_path / "keras"
    assert main(["train", *SMALL, "--epochs", "1", "--no-pictures", "--out", str(out), "--optimizer", "keras-rmsprop",
                 "--rho", "0.9", "--epsilon", "1e-7", "--batch-size", "16"]) == 0
    capsys.readouterr()
    assert main(["info", str(out / "checkpoint.npz"), "--json"]) == 0
    tc = json.loads(capsys.readouterr().out)["train_config"]
    assert (tc["optimizer"], tc["rho"], tc["epsilon"], tc["batch_size"]) == ("keras-rmsprop", 0.9, 1e-7, 16)
    # a switch takes no value; a setting the optimizer does not take is one line
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(tmp_path / "x"), "--amsgrad", "--optimizer", "sgd"]) == 2
    assert "amsgrad" in capsys.readouterr().err
