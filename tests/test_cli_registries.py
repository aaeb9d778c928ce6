"""The command line is derived from the registries: every preset, config option, training setting,
built-in dataset and figure appears in it without being listed there, and a preset-specific option
is refused for the presets that do not take it."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from npvae import data
from npvae.cli import build_parser, main
from npvae.cli.options import model_knobs, train_knobs
from npvae.models import MODELS
from npvae.train import TrainConfig
from npvae.viz.figures import FIGURES, FigureInput


def command(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def options(name: str) -> dict[str, argparse.Action]:
    return {flag: a for a in command(name)._actions for flag in a.option_strings}


def test_the_model_help_names_every_preset_and_describes_it():
    train = command("train")
    model = options("train")["--model"]
    assert tuple(model.choices) == tuple(MODELS)
    text = train.format_help()
    for name, cls in MODELS.items():
        assert name in model.help and cls.help and f"  {name:<16} {cls.help}" in text, name


def test_every_config_option_of_every_preset_is_a_flag():
    flags = options("train")
    for name, cls in MODELS.items():
        for f in dataclasses.fields(cls.config_class):
            knob = model_knobs().get(f.name)
            if f.metadata.get("cli", True) and f.metadata.get("help"):
                assert knob is not None and knob.flag in flags and name in knob.presets, (name, f.name)


def test_every_training_setting_with_option_metadata_is_a_flag():
    flags = options("train")
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli", True):
            assert train_knobs()[f.name].flag in flags, f.name
    assert "--kl-warmup" in flags and "--no-pictures" in flags and "--fixed-prior" in flags
    assert "grad_norm_every" not in train_knobs()  # set from --config only


def test_choices_come_from_the_registries():
    from npvae.optim import OPTIMIZERS

    assert tuple(options("train")["--dataset"].choices) == data.builtin_datasets() == (*data.DATASETS, data.DEMO)
    assert tuple(options("train")["--optimizer"].choices) == tuple(OPTIMIZERS)
    plot = command("plot")
    what = next(a for a in plot._actions if a.dest == "what")
    assert tuple(what.choices) == tuple(FIGURES)
    text = plot.format_help()
    for name, figure in FIGURES.items():
        assert f"  {name:<16} {figure.help.splitlines()[0]}" in text, name
        if figure.default_n:
            assert f"default --n {figure.default_n}" in text


def test_a_preset_default_shows_in_the_help():
    assert "conv-dae 2048" in options("train")["--batch-size"].help
    assert "conv-dae 10" in options("train")["--patience"].help
    assert "vae, cvae, conv-vae" in options("train")["--beta"].help


@pytest.mark.parametrize("flags, message", [
    (["--model", "ae", "--beta", "2"], "--beta applies to --model vae, cvae and conv-vae"),
    (["--model", "vae", "--noise-level", "0.3"], "--noise-level applies to --model dae and conv-dae"),
    (["--model", "cvae", "--logvar-bounds", "-5", "5"], "--logvar-bounds applies to --model vae and conv-vae"),
    (["--model", "vae", "--fixed-prior"], "--fixed-prior applies to --model cvae"),
    (["--model", "conv-ae", "--hidden", "8"], "--hidden sets MLP widths; --model conv-ae has the write-up's"),
])
def test_an_option_the_preset_does_not_take_fails_before_any_data_loads(tmp_path, capsys, flags, message):
    assert main(["train", "--dataset", "demo", *flags, "--out", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "data:" not in captured.out
    assert not (tmp_path / "run").exists()


def test_every_figure_says_what_it_needs():
    for name, figure in FIGURES.items():
        assert figure.name == name and len(figure.help) > 20 and callable(figure.draw)
        assert set(figure.options) <= {f.name for f in dataclasses.fields(FigureInput)}, name
        assert figure.images(3, 4, type("M", (), {"num_classes": 2})()) >= 3


def test_the_samples_figure_draws_through_the_registry(tmp_path):
    from npvae.models import VAE

    model = VAE(16, (8,), 2)
    path, lines = FIGURES["samples"].draw(FigureInput(model, tmp_path / "s.png", np.random.default_rng(0), n=4))
    assert path.is_file() and lines == []
