"""The public model interface: your own layers, any data shape, fit, specs in checkpoints, old checkpoints,
and no module branching on a model's kind."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import npvae
from npvae import Dense, Flatten, Reshape, Sequential
from npvae.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from npvae.cli import main
from npvae.gradcheck import check_model
from npvae.models import CVAE, VAE, Autoencoder, GaussianLatent, StandardNormalPrior, load_model, save_model

ROOT = Path(__file__).resolve().parents[2]


def own_vae(dtype=np.float32, seed=0):
    """A VAE over 20x20 images built from the user's own stacks."""
    return VAE(encoder=Sequential(Flatten(), Dense(400, 32, "relu")),
               decoder=Sequential(Dense(4, 32, "tanh"), Dense(32, 400), Reshape((20, 20))),
               latent_dim=4, input_shape=(20, 20), dtype=dtype, seed=seed)


def test_own_layers_give_exact_gradients_on_image_shaped_data():
    model = own_vae(np.float64)
    x = np.random.default_rng(0).random((3, 20, 20))
    report = check_model(model, x, max_entries=10)
    assert report.worst[1] < 1e-6, report.worst
    assert list(model.state_dict())[:4] == ["encoder.1.weight", "encoder.1.bias", "mu.weight", "mu.bias"]


def test_fit_save_load_encode_on_a_users_float_array(tmp_path):
    x = np.random.default_rng(1).random((200, 20, 20)).astype(np.float32)
    model = own_vae()
    result = npvae.fit(model, x, epochs=2, batch_size=32)
    assert [r["epoch"] for r in result.history] == [1, 2] and np.isfinite(result.history[-1]["val_loss"])
    npvae.save_model(model, tmp_path / "m.npz")
    loaded, meta = npvae.load_model(tmp_path / "m.npz")
    assert meta["model_format"] == 2 and loaded.input_shape == (20, 20)
    np.testing.assert_array_equal(loaded.encode(x[:5])[0], model.encode(x[:5])[0])
    assert loaded.reconstruct(x[:3]).shape == (3, 20, 20) and loaded.sample(2, np.random.default_rng(0)).shape == (2, 20, 20)


def test_fit_trains_input_to_target_pairs_and_refuses_unknown_options():
    rng = np.random.default_rng(2)
    clean = rng.random((120, 12)).astype(np.float32)
    noisy = np.clip(clean + 0.1 * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
    model = Autoencoder(12, (8,), 3, output_activation="sigmoid", value_range=(0, 1))
    result = npvae.fit(model, noisy, target=clean, epochs=2, batch_size=16)
    terms = model.evaluate(noisy, rng=np.random.default_rng(0), target=clean)
    assert terms.recon == pytest.approx(model.evaluate(noisy, rng=np.random.default_rng(0), target=clean).recon)
    assert terms.recon != model.evaluate(noisy, rng=np.random.default_rng(0)).recon
    assert len(result.history) == 2
    with pytest.raises(TypeError, match="unknown options learning_rate"):
        npvae.fit(model, noisy, learning_rate=0.1)


def test_capabilities_are_classes_not_kind_strings():
    assert isinstance(VAE(8, (4,), 2), GaussianLatent) and isinstance(VAE(8, (4,), 2), StandardNormalPrior)
    cvae = CVAE(8, 3, (4,), 2)
    assert isinstance(cvae, GaussianLatent) and not isinstance(cvae, StandardNormalPrior)
    assert not isinstance(Autoencoder(8, (4,), 2), GaussianLatent)
    with pytest.raises(ValueError, match="CVAE is conditional: pass its labels y"):
        cvae.loss_and_grads(np.zeros((2, 8)), rng=np.random.default_rng(0))
    # unconditional models ignore labels
    vae = VAE(8, (4,), 2, dtype=np.float64)
    x, eps = np.full((2, 8), 0.5), np.zeros((2, 2))
    assert vae.loss_and_grads(x, [0, 1], eps=eps)[0] == vae.loss_and_grads(x, eps=eps)[0]


def test_no_module_branches_on_a_kind_string_or_reaches_into_private_names():
    offenders = []
    for path in (ROOT / "npvae").rglob("*.py"):
        if path.name == "cvae.py":
            continue
        text = path.read_text()
        for pattern in (r"model\.kind\s*(==|!=|in\b|not in\b)", r"getattr\(model, .kind.[^)]*\)\s*(==|!=|in\b|not in\b)",
                        r"kind\s*(==|!=)\s*['\"](vae|cvae|ae|dae|poor)['\"]",
                        r"\.conditional\b", r"model\._[a-z]", r"ops\._[a-z]"):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not offenders, offenders


def test_checkpoints_carry_the_spec_and_old_format_files_still_load(tmp_path):
    model = VAE(8, (6,), 2, seed=3)
    # a file as npvae wrote it before the layer stacks: preset name, config, and the decoder's last layer as "output"
    state = model.state_dict()
    old = {("model/output." + k.split(".")[-1] if k.startswith("decoder.1.") else "model/" + k): v for k, v in state.items()}
    save_checkpoint(tmp_path / "v1.npz", old, {"model": "vae", "dtype": "float32", "model_config": {
        "input_dim": 8, "hidden": [6], "latent_dim": 2, "activation": "relu", "likelihood": "bernoulli", "beta": 1.0,
        "alpha": 0.01, "logvar_bounds": None}})
    loaded, _ = load_model(tmp_path / "v1.npz")
    for key, value in state.items():
        np.testing.assert_array_equal(loaded.state_dict()[key], value, err_msg=key)
    arrays, meta = load_checkpoint(save_model(model, tmp_path / "v2.npz"))
    save_checkpoint(tmp_path / "v9.npz", arrays, {**meta, "model_format": 9})
    with pytest.raises(CheckpointError, match="model format 9 .*reads model formats 1 to 2"):
        load_model(tmp_path / "v9.npz")
    spec = dict(meta["model_spec"], parts={"encoder": {"type": "Lambda"}, "decoder": {"type": "Lambda"}})
    spec["config"] = dict(spec["config"], hidden=None)
    save_checkpoint(tmp_path / "bad.npz", arrays, {**meta, "model_spec": spec})
    with pytest.raises(CheckpointError, match="unknown layer type 'Lambda'"):
        load_model(tmp_path / "bad.npz")


@pytest.mark.slow
def test_cli_trains_on_a_users_npy_array(tmp_path, capsys):
    x = np.random.default_rng(0).random((300, 20, 20)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "x.npy"), "--epochs", "1", "--hidden", "32", "--latent-dim", "2",
                 "--out", str(out), "--no-progress"]) == 0
    model, meta = load_model(out / "best.npz")
    assert model.input_shape == (20, 20) and meta["data_source"]["kind"] == "path"
    assert (out / "samples.png").exists() and (out / "reconstructions.png").exists()
    capsys.readouterr()
    assert main(["evaluate", str(out / "best.npz")]) == 0  # the data is remembered
    assert "negative ELBO" in capsys.readouterr().out


def test_a_checkpoint_whose_description_outgrows_its_arrays_is_refused_before_allocating(tmp_path):
    arrays, meta = load_checkpoint(save_model(VAE(8, (6,), 2), tmp_path / "m.npz"))
    spec = dict(meta["model_spec"], config=dict(meta["model_spec"]["config"], hidden=[2**20, 2**20]))
    save_checkpoint(tmp_path / "huge.npz", arrays, {**meta, "model_spec": spec})
    with pytest.raises(CheckpointError, match=r"needs [\d,]+ parameters but the file holds 156"):
        load_model(tmp_path / "huge.npz")


@pytest.mark.slow
def test_cli_remembers_a_users_data_for_resume_and_names_it_when_moved(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((100, 6, 6)).astype(np.float32))
    out = tmp_path / "run"
    common = ["--hidden", "8", "--latent-dim", "2", "--out", str(out), "--no-progress", "--no-pictures"]
    assert main(["train", "--data", str(tmp_path / "x.npy"), "--epochs", "1", *common]) == 0
    assert main(["train", "--epochs", "2", "--resume", *common]) == 0  # no --data: the run's own file
    assert load_checkpoint(out / "checkpoint.npz")[1]["epoch"] == 2
    (tmp_path / "x.npy").rename(tmp_path / "moved.npy")
    capsys.readouterr()
    assert main(["evaluate", str(out / "best.npz")]) == 2
    assert "pass --data PATH to point elsewhere" in capsys.readouterr().err
    assert main(["evaluate", str(out / "best.npz"), "--data", str(tmp_path / "moved.npy")]) == 0
