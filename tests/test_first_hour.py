"""A newcomer's first hour (issue 25): what someone meets trying the README, their own data, the Python
API and the minimal install, each the way it once went wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import npvae
from npvae.cli import main
from npvae.models import VAE


# ----------------------------------------------------------------------------- 1. data viewed in the model's shape


@pytest.fixture(scope="module")
def square_vae(tmp_path_factory):
    """A model saved with input_shape=(28, 28), as the README's PyTorch round trip saves one."""
    path = tmp_path_factory.mktemp("square") / "square.npz"
    npvae.save_model(VAE(input_shape=(28, 28), hidden=(16,), latent_dim=2, seed=0), path)
    return path


@pytest.mark.parametrize("model_shape, data_shape", [((28, 28), (5, 784)), ((784,), (5, 28, 28)),
                                                     ((784,), (5, 1, 28, 28))])
@pytest.mark.parametrize("method", ["encode", "reconstruct", "evaluate", "loss_and_grads"])
def test_methods_view_rows_of_the_models_size_in_its_shape(model_shape, data_shape, method):
    model = VAE(input_shape=model_shape, hidden=(8,), latent_dim=2, dtype=np.float64, seed=0)
    x = np.random.default_rng(1).random(data_shape)
    as_model = x.reshape(len(x), *model_shape)
    kwargs = {"rng": np.random.default_rng(2)} if method in ("evaluate", "loss_and_grads") else {}
    got = getattr(model, method)(x, **kwargs)
    kwargs = {"rng": np.random.default_rng(2)} if kwargs else {}
    want = getattr(model, method)(as_model, **kwargs)
    for a, b in zip(np.atleast_1d(got[0] if method == "loss_and_grads" else got),
                    np.atleast_1d(want[0] if method == "loss_and_grads" else want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fit_trains_a_flat_model_on_square_images():
    x = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    model = VAE(hidden=(8,), latent_dim=2, seed=0)
    result = npvae.fit(model, x, epochs=1, batch_size=16)
    assert np.isfinite(result.history[-1]["train_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("command", [["evaluate"], ["reconstruct", "--n", "4"], ["plot", "_", "latent", "--n", "50"],
                                     ["plot", "_", "kl", "--n", "50"], ["plot", "_", "interpolation"]])
def test_cli_uses_a_square_model_on_flat_builtin_data(square_vae, tmp_path, command):
    argv = [command[0], str(square_vae), *[a for a in command[1:] if a != "_"], "--dataset", "demo"]
    if command[0] != "evaluate":
        argv += ["--out", str(tmp_path / "out.png")]
    assert main(argv) == 0


@pytest.mark.slow
def test_cli_evaluates_a_flat_model_on_square_images(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "demo", "--hidden", "16", "--latent-dim", "2", "--epochs", "1",
                 "--no-progress", "--out", str(run)]) == 0
    images = npvae.data.load_demo().test_x[:50].reshape(-1, 28, 28)  # (N, 28, 28) uint8: a user's PNGs
    np.savez(tmp_path / "images.npz", x=images)
    capsys.readouterr()
    argv = ["evaluate", str(run / "checkpoint.npz"), "--data", str(tmp_path / "images.npz"), "--split", "all"]
    assert main(argv) == 0
    assert "negative ELBO" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 5. uint8 and the default rng


@pytest.fixture(scope="module")
def pixels():
    return npvae.data.load_demo().test_x[:20]  # (20, 784) uint8


@pytest.mark.parametrize("method", ["encode", "codes", "reconstruct", "evaluate"])
def test_every_method_reads_uint8_as_fit_does(pixels, method):
    from npvae.train import prepare_split

    model = VAE(hidden=(8,), latent_dim=2, seed=0)
    scaled = prepare_split(pixels, model, "none", 0)  # what fit() and the trainer feed the model
    got, want = getattr(model, method)(pixels), getattr(model, method)(scaled)
    for a, b in zip(np.atleast_1d(got), np.atleast_1d(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_decompose_gradients_reads_uint8(pixels):
    from npvae.study.gradflow import decompose_gradients

    model = VAE(hidden=(8,), latent_dim=2, dtype=np.float64, seed=0)
    eps = np.random.default_rng(0).standard_normal((len(pixels), 2))
    got = decompose_gradients(model, pixels, eps)
    want = decompose_gradients(model, pixels / 255.0, eps)
    for key in want:
        np.testing.assert_allclose(got[key][0], want[key][0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset", ["vae", "cvae", "ae"])
def test_sample_and_evaluate_without_an_rng_are_seeded(pixels, preset):
    from npvae.models import MODELS
    from npvae.models.base import DEFAULT_SEED

    model = MODELS[preset](seed=0)
    assert np.array_equal(model.sample(16), model.sample(16))
    assert np.array_equal(model.sample(16), model.sample(16, np.random.default_rng(DEFAULT_SEED)))
    y = np.arange(len(pixels)) % 10
    assert model.evaluate(pixels, y) == model.evaluate(pixels, y, np.random.default_rng(DEFAULT_SEED))


# ----------------------------------------------------------------------------- 14. the command line's polish


def test_bare_npvae_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: npvae") and "train" in out and "evaluate" in out


@pytest.mark.parametrize("argv, line", [
    (["train", "--model", "x"], "npvae train: error: argument --model: invalid choice: 'x' (choose from 'vae', "),
    (["evaluate"], "npvae evaluate: error: the following arguments are required: checkpoint"),
    (["frob"], "npvae: error: argument COMMAND: invalid choice: 'frob'"),
])
def test_a_usage_error_is_one_line_and_where_to_look(capsys, argv, line):
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(line)
    prog = "npvae" if argv[0] == "frob" else f"npvae {argv[0]}"
    assert err[1] == f"run '{prog} --help' for its options"


def test_asking_for_numba_without_numba_follows_the_environment_variables_rule(monkeypatch):
    from npvae import backend

    monkeypatch.setattr(backend, "_active", backend.get_backend())  # restored when the test ends
    monkeypatch.setattr(backend, "_numba_available", False)
    with pytest.warns(RuntimeWarning, match=r"--backend numba, but Numba is not installed: npvae runs its "
                                            r"NumPy kernels"):
        assert backend.request_backend("numba", "--backend numba") == "numpy"


def _train_quietly(tmp_path, *extra):
    return main(["train", "--dataset", "demo", "--hidden", "8", "--latent-dim", "2", "--epochs", "1", "--no-progress",
                 "--no-pictures", "--out", str(tmp_path / "run"), *extra])


def test_train_limit_trains_on_the_first_n_examples(tmp_path, capsys):
    import json

    assert _train_quietly(tmp_path, "--limit", "100", "--batch-size", "50") == 0
    assert "training on its first 100 examples" in capsys.readouterr().out
    epochs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in epochs if r["event"] == "epoch"] == [2]


def test_the_minimal_install_hears_once_that_tqdm_gives_a_progress_bar(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    lines = []
    x = npvae.data.load_demo().train_x[:64]
    npvae.fit(VAE(hidden=(8,), latent_dim=2), x, epochs=2, batch_size=32, progress=True, echo=lines.append)
    assert [line for line in lines if "tqdm" in line] == ["(pip install tqdm for a progress bar within each epoch)"]


def _script_parsers():
    """Every script's argument parser, caught as its main() asks it to parse."""
    import argparse
    import runpy
    import sys
    from pathlib import Path
    from unittest import mock

    class Caught(Exception):
        pass

    def catch(self, args=None, namespace=None):
        raise Caught(self)

    for path in sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py")):
        with mock.patch.object(argparse.ArgumentParser, "parse_args", catch), \
                mock.patch.object(sys, "argv", [str(path)]):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except Caught as exc:
                yield path.name, exc.args[0]


def test_every_script_flag_has_help_and_shows_its_default():
    import argparse

    checked = 0
    for name, parser in _script_parsers():
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"scripts/{name}: {action.option_strings or action.dest} has no help"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                shown = parser.formatter_class(parser.prog)._get_help_string(action)
                assert "default" in shown, f"scripts/{name}: {action.option_strings[0]} does not show its default"
        checked += 1
    assert checked >= 10


# ----------------------------------------------------------------------------- 2. the first run's compile


needs_numba = pytest.mark.skipif(not npvae.backend.numba_available(), reason="numba not installed")


@needs_numba
def test_warming_the_kernels_up_leaves_training_bit_identical(monkeypatch):
    from npvae import train

    x = npvae.data.load_demo().train_x[:96]

    def trained():
        model = VAE(hidden=(16,), latent_dim=2, seed=0)
        npvae.fit(model, x, epochs=2, batch_size=32, clip_grad_norm=5.0)
        return model.params.data.copy()

    with npvae.use_backend("numba"):
        warmed = trained()
        monkeypatch.setattr(train.Trainer, "_warm_up_kernels", lambda self: None)
        cold = trained()
    np.testing.assert_array_equal(warmed, cold)


@needs_numba
def test_a_slow_warm_up_says_it_compiles_once_before_the_first_epoch(monkeypatch):
    import time

    from npvae import train

    monkeypatch.setattr(train, "COMPILE_NOTICE_S", 0.0)
    slow_evaluate = VAE.evaluate

    def evaluate(self, *args, **kwargs):
        time.sleep(0.3)  # as a compile would
        return slow_evaluate(self, *args, **kwargs)

    monkeypatch.setattr(VAE, "evaluate", evaluate)
    lines = []
    with npvae.use_backend("numba"):
        npvae.fit(VAE(hidden=(8,), latent_dim=2), npvae.data.load_demo().train_x[:64], epochs=2, batch_size=32,
                  echo=lines.append)
    assert lines[0] == "compiling kernels (once per install, ~30 s) ..."
    assert lines[1].startswith("kernels compiled in ") and lines[2].startswith("epoch 1/2")
    assert sum("compiling" in line for line in lines) == 1


# ----------------------------------------------------------------------------- 10. the test split alone

SHARED_MNIST = Path("/work/shared/data/mnist")


@pytest.mark.skipif(not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason="no MNIST t10k files")
@pytest.mark.parametrize("command", [["evaluate", "--n", "200"], ["reconstruct", "--n", "4"]])
def test_a_model_is_scored_on_mnist_with_only_the_t10k_files(square_vae, tmp_path, monkeypatch, capsys, command):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no other copy of MNIST found
    monkeypatch.delenv("NPVAE_DATA_DIR", raising=False)
    argv = [command[0], str(square_vae), "--dataset", "mnist", "--data-dir", str(SHARED_MNIST.parent), *command[1:]]
    if command[0] == "reconstruct":
        argv += ["--out", str(tmp_path / "r.png")]
    assert main(argv) == 0, capsys.readouterr().err
    assert not (tmp_path / "cache" / "npvae").exists()  # nothing downloaded


# ----------------------------------------------------------------------------- 13. outputs beside the run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "--dataset", "demo", "--hidden", "16", "--latent-dim", "2", "--epochs", "1",
                 "--no-progress", "--no-pictures", "--out", str(run)]) == 0
    return run


@pytest.mark.slow
@pytest.mark.parametrize("argv, written", [
    (["sample", "--n", "4"], "best_samples.png"),
    (["reconstruct", "--n", "2"], "best_reconstructions.png"),
    (["plot", "manifold", "--n", "3"], "best_manifold.png"),
    (["grads", "--n", "4", "--draws", "4", "--dims", "1", "--examples", "1"], "best_grads/decomposition.png"),
])
def test_outputs_land_beside_the_checkpoint_unless_out_says_otherwise(tiny_run, tmp_path, monkeypatch, argv, written):
    monkeypatch.chdir(tmp_path)
    command = [argv[0], str(tiny_run / "best.npz"), *argv[1:]]
    assert main(command) == 0
    assert (tiny_run / written).is_file() and list(tmp_path.iterdir()) == []
    mine = tmp_path / ("mine" if argv[0] == "grads" else "mine.png")  # --out as before
    assert main([*command, "--out", str(mine)]) == 0
    assert mine.exists()


# ----------------------------------------------------------------------------- 11. lines that say what they are


def test_iwae_training_names_its_bound_and_validation_its_elbo():
    lines = []
    npvae.fit(VAE(hidden=(8,), latent_dim=2), npvae.data.load_demo().train_x[:64], epochs=1, batch_size=32,
              objective="iwae", k=3, echo=lines.append)
    assert "train negative IWAE bound (k = 3) " in lines[-1] and "(weighted recon " in lines[-1]
    assert "val negative ELBO " in lines[-1] and ", KL " in lines[-1]


def test_a_sparse_autoencoders_line_adds_up():
    import re

    from npvae.models import MODELS

    lines = []
    model = MODELS["sparse-ae"](latent_dim=16)
    npvae.fit(model, npvae.data.load_demo().train_x[:64], epochs=1, batch_size=32, echo=lines.append)
    line = lines[-1]
    assert line.split(": train")[0].endswith("squared error + 3 x sparsity")
    total, error, sparsity = map(float, re.search(r"train ([\d.]+) \(squared error ([\d.]+), sparsity ([\d.]+)\)",
                                                  line).groups())
    assert total == pytest.approx(error + 3 * sparsity, abs=0.02)


@pytest.mark.slow
def test_plot_grad_norms_on_a_run_without_them_says_how_to_get_them(tiny_run, capsys):
    assert main(["plot", str(tiny_run / "best.npz"), "grad-norms"]) == 2
    err = capsys.readouterr().err
    assert "this run did not log gradient norms" in err and "train with --log-grad-norms" in err
    assert "enc.fc1" not in err


@pytest.mark.slow
def test_evaluate_gives_its_estimates_with_their_standard_error_at_one_precision(tiny_run, capsys):
    import json
    import re

    assert main(["evaluate", str(tiny_run / "best.npz"), "--iw-samples", "5", "--n", "100", "--json"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"test: negative ELBO \d+\.\d\d ± \d+\.\d\d nats", out)
    assert re.search(r"k = 5: \d+\.\d\d ± \d+\.\d\d per image", out)
    assert not re.search(r"\d\.\d{3}\b", out.split("{")[0])  # no third decimal anywhere in the text
    result = json.loads(out.strip().splitlines()[-1])
    assert 0 < result["loss_se"] < result["loss"]


# ----------------------------------------------------------------------------- 6. two trainings in a row


@pytest.mark.slow
def test_two_trainings_in_a_row_without_out_do_not_collide_and_resume_finds_the_latest(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    small = ["--dataset", "demo", "--hidden", "8", "--latent-dim", "2", "--epochs", "1", "--limit", "64",
             "--no-progress", "--no-pictures"]
    assert main(["train", *small]) == 0 and main(["train", *small]) == 0
    assert (tmp_path / "runs/vae-demo/best.npz").is_file() and (tmp_path / "runs/vae-demo-2/best.npz").is_file()
    assert "writing to runs/vae-demo-2/" in capsys.readouterr().out
    assert main(["train", "--resume", "--epochs", "2", "--no-progress", "--dataset", "demo"]) == 0
    assert "resumed from runs/vae-demo-2/checkpoint.npz" in capsys.readouterr().out


def test_a_taken_out_says_choose_another_out_first(tmp_path):
    from npvae.rundir import claim_outputs

    (tmp_path / "checkpoint.npz").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"choose another --out for a new run \(or --resume to continue"):
        claim_outputs(tmp_path, overwrite=False)


# ----------------------------------------------------------------------------- 12. README snippets as written


def test_npvae_torch_after_import_npvae_alone():
    import subprocess
    import sys

    pytest.importorskip("torch")
    code = ("import sys, npvae; assert 'torch' not in sys.modules; "
            "print(type(npvae.torch.to_torch(npvae.VAE(hidden=(8,), latent_dim=2))).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr
    with pytest.raises(AttributeError, match="has no attribute 'nonsense'"):
        npvae.nonsense  # noqa: B018


# ----------------------------------------------------------------------------- 8. no prior, no "samples"


@pytest.mark.parametrize("preset, has_prior", [("vae", True), ("cvae", True), ("poor", True), ("ae", False),
                                               ("sparse-ae", False), ("conv-dae", False), ("conv-doc-dae", False)])
def test_training_draws_samples_only_for_models_with_a_prior(preset, has_prior, tmp_path):
    from npvae.models import MODELS
    from npvae.viz import figures

    model = MODELS[preset](**({"num_classes": 10} if preset == "cvae" else {}))
    shape = model.input_shape
    x = np.random.default_rng(0).random((4, *shape)).astype(model.dtype)
    lo, hi = model.value_range
    x = lo + (hi - lo) * x
    y = np.arange(4) % 10 if preset == "cvae" else None
    written = [p.name for p in figures.epoch_pictures(model, x, y, tmp_path, 1)]
    assert ("samples.png" in written) == has_prior


@pytest.mark.slow
def test_sampling_a_model_without_a_prior_says_what_it_draws(tmp_path, capsys):
    run = tmp_path / "ae"
    assert main(["train", "--model", "sparse-ae", "--dataset", "demo", "--epochs", "1", "--limit", "64",
                 "--no-progress", "--out", str(run)]) == 0
    assert not (run / "samples.png").exists()
    capsys.readouterr()
    assert main(["sample", str(run / "best.npz"), "--n", "4"]) == 0
    assert "sparse-ae has no prior: these are decoded N(0, I) codes, not samples of the data" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 9. no long silences


def test_the_k_study_says_each_k_as_it_finishes_and_measures_what_one_call_measures(capsys):
    from npvae.cli.grads import _snr_study
    from npvae.study import gradflow

    model = VAE(hidden=(8,), latent_dim=2, dtype=np.float64, seed=0)
    x = npvae.data.load_demo().test_x[:2] / 255.0

    class Args:
        k, snr_draws, objective, snr_signal, split = [1, 3], 4, "iwae", "own", "test"

    rows = _snr_study(Args, model, x, None, None, 2, np.random.default_rng(5))
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("measuring the --k study") and err[1].startswith("  k = 1 done (1/2, ")
    assert err[2].startswith("  k = 3 done (2/2, ")
    assert rows == gradflow.estimator_snr(model, x, [1, 3], 4, np.random.default_rng(5), objective="iwae")


# ----------------------------------------------------------------------------- 4. scripts run from anywhere


def test_no_script_default_points_into_this_repositorys_layout_or_overwrites_docs():
    for name, parser in _script_parsers():
        for action in parser._actions:
            if isinstance(action.default, str):
                assert "shared/data" not in action.default, f"scripts/{name}: {action.option_strings}"
                assert not action.default.startswith("docs"), f"scripts/{name}: {action.option_strings} writes docs/"


@pytest.mark.parametrize("script, argv", [("parity.py", []), ("estimator_study.py", ["likelihood"])])
def test_a_script_without_its_data_says_so_in_one_line(script, argv, monkeypatch, tmp_path):
    import runpy
    import sys

    def missing(name, split, **kwargs):
        raise npvae.data.DownloadError(f"could not download {name} {split}: offline. Pass --data-dir DIR")

    monkeypatch.setattr(npvae.data, "load_mnist_like", missing)
    monkeypatch.setattr(sys, "argv", [script, *argv, *(["--out", str(tmp_path)] if argv else [])])
    monkeypatch.setitem(sys.modules, "torch", None)  # parity: npvae alone
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / script), run_name="__main__")
    assert str(exc.value.code).startswith(f"{script.split()[0]}{' ' + argv[0] if argv else ''}: could not download")


# ----------------------------------------------------------------------------- 7. pictures that show nothing


@pytest.mark.slow
def test_a_run_too_short_to_learn_says_so(tmp_path, capsys):
    assert main(["train", "--dataset", "demo", "--epochs", "1", "--limit", "64", "--batch-size", "64", "--no-progress",
                 "--no-pictures", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "note: the reconstructions barely differ from one image to the next" in out
    assert "after 1 steps this usually means too few" in out or "after 1 step" in out


def test_a_collapsed_posterior_is_named():
    from npvae.cli.train import _blank_model_notes

    model = VAE(hidden=(8,), latent_dim=2, seed=0)
    x = npvae.data.load_demo().test_x[:50] / np.float32(255)
    notes = _blank_model_notes(model, x, None, {"reg": 0.14}, 3)
    assert any("the KL is 0.14 nats per image" in n and "posterior collapse" in n for n in notes)
    assert not any("KL" in n for n in _blank_model_notes(model, x, None, {"reg": 20.0}, 3000))


# ----------------------------------------------------------------------------- 15. plot polish


def test_kl_legend_names_only_the_bars_drawn_and_short_runs_tick_whole_epochs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from npvae.viz import plots

    saved, save = [], plots._save

    def keep(fig, path):  # what the picture shows, read before saving closes the figure
        ax = fig.axes[0]
        legend = ax.get_legend()
        saved.append(([t.get_text() for t in legend.get_texts()] if legend else [], list(ax.get_xticks())))
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_kl_per_dim(np.array([2.0, 0.5]), tmp_path / "kl.png")
    assert "active" in saved[-1][0] and "inactive" not in saved[-1][0]  # none is inactive
    records = [{"event": "epoch", "epoch": e, "train_loss": 3.0 - e, "val_loss": 3.1 - e} for e in (1, 2)]
    plots.plot_training_curves(records, tmp_path / "curves.png")
    assert saved[-1][1] and all(float(t).is_integer() for t in saved[-1][1])
