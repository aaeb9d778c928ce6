"""The command line explains itself: a description for every command, a help line for every option
with its default shown once, ``--version``, ``npvae info`` and ``npvae train --config``."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

import npvae
from npvae.checkpoint import load_checkpoint
from npvae.cli import build_parser, main
from npvae.models import VAE, save_model
from npvae.optim import OPTIMIZERS

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "demo", "--hidden", "16", "--latent-dim", "2", "--no-progress", "--no-pictures"]


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_and_option_explains_itself(name):
    p = commands()[name]
    assert p.description and len(p.description) > 40, name
    formatter = p._get_formatter()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = action.help or ""
        assert len(text) > 5, (name, action.dest)
        shown = formatter._expand_help(action)
        assert shown.count("default") <= 1, (name, action.dest, shown)
        if action.option_strings and action.default is not None and action.default is not False:  # 0 shows
            assert "default" in shown, (name, action.dest, shown)
    assert p.format_help().count("(default: %") == 0  # every default was filled in


def test_the_top_level_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in commands():
        assert re.search(rf"^    {name}\s+\S", out, re.M), name


def test_version_matches_the_package(capsys):
    assert main(["--version"]) == 0
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert capsys.readouterr().out.strip() == f"npvae {version}" == f"npvae {npvae.__version__}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--epochs", "2", "--lr", "0.002", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_info_describes_a_training_checkpoint(run, capsys):
    assert main(["info", str(run / "checkpoint.npz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    history = load_checkpoint(run / "checkpoint.npz")[1]["history"]
    best = min(history, key=lambda r: r["val_loss"])
    assert lines[0] == f"{run / 'checkpoint.npz'}: a training checkpoint (resumable with --resume)"
    assert lines[1].startswith("model: VAE(input_dim=784, hidden=(16,), latent_dim=2")
    assert lines[2].startswith("data: demo subset: 5,000 real MNIST digits shipped with npvae (4,500 train / 500 validation")
    assert "epochs=2" in lines[3] and "lr=0.002" in lines[3] and lines[3].startswith("training: ")
    assert lines[4] == f"epochs: 2 of 2 done (step {history[-1]['step']})"
    assert lines[5] == f"best validation loss: {best['val_loss']:.4f} (epoch {best['epoch']})"


@pytest.mark.slow
def test_info_of_best_and_of_a_saved_model(run, tmp_path, capsys):
    assert main(["info", str(run / "best.npz"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "vae" and info["train_config"]["lr"] == 0.002 and info["best_epoch"] in (1, 2)
    assert info["data_source"] == {"kind": "builtin", "name": "demo", "data_dir": None}
    path = save_model(VAE(784, (8,), 2), tmp_path / "m.npz")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a saved model" in out and "training: not recorded" in out and "best validation" not in out


@pytest.mark.slow
def test_config_sets_what_flags_do_not(tmp_path, capsys):
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"epochs": 1, "lr": 0.005, "seed": 3, "patience": None, "eval_batch_size": 250,
                                  "pictures": False, "batch_size": 64}))
    assert main(["train", *TINY, "--config", str(config), "--seed", "7", "--batch-size", "128",
                 "--out", str(tmp_path / "a")]) == 0
    tc = load_checkpoint(tmp_path / "a" / "checkpoint.npz")[1]["train_config"]
    assert (tc["epochs"], tc["lr"], tc["patience"], tc["eval_batch_size"], tc["pictures"]) == (1, 0.005, None, 250, False)
    assert (tc["seed"], tc["batch_size"]) == (7, 128)  # given explicitly, even at its default value
    capsys.readouterr()
    assert main(["info", str(tmp_path / "a" / "checkpoint.npz"), "--json"]) == 0  # info's JSON is a config too
    (tmp_path / "info.json").write_text(capsys.readouterr().out)
    assert main(["train", *TINY, "--config", str(tmp_path / "info.json"), "--out", str(tmp_path / "b")]) == 0
    assert load_checkpoint(tmp_path / "b" / "checkpoint.npz")[1]["train_config"] == tc


@pytest.mark.parametrize("content, message", [
    ({"epochs": 1, "learning_rate": 0.1}, "unknown setting learning_rate; the settings are epochs, batch_size, lr"),
    ({"lr": "0.1"}, 'lr must be a number, got "0.1"'),
    ({"epochs": 1.5}, "epochs must be an integer, got 1.5"),
    ({"epochs": True}, "epochs must be an integer, got true"),
    ({"patience": "none"}, 'patience must be an integer or null, got "none"'),
    ({"pictures": 1}, "pictures must be true or false, got 1"),
    ({"optimizer": "lbfgs"}, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got 'lbfgs'"),
    ([1, 2], "expected a JSON object of training settings, got list"),
    ("{not json", "not valid JSON"),
])
def test_bad_configs_are_one_line(content, message, tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(content if isinstance(content, str) else json.dumps(content))
    assert main(["train", *TINY, "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and f"--config {config}" in err, err
    assert not (tmp_path / "run").exists()
    assert main(["train", *TINY, "--config", str(tmp_path / "missing.json")]) == 2
    assert "No such file" in capsys.readouterr().err
