"""The trainer builds its optimizer from the registry, with TrainConfig's optimizer settings; old runs resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from npvae import data, optim
from npvae.checkpoint import load_checkpoint, save_checkpoint
from npvae.models import VAE
from npvae.train import TrainConfig, Trainer, check_run_meta
from tests.helpers import load_script

# The TrainConfig fields this change added: a checkpoint written before it has none of them.
NEW_FIELDS = ("rho", "epsilon", "beta1", "beta2", "amsgrad", "centered", "nesterov", "dampening")


@pytest.fixture(scope="module")
def tiny_dataset():
    demo = data.load_demo()
    return data.Dataset("demo", demo.train_x[:200], demo.train_y[:200], demo.val_x[:40], demo.val_y[:40],
                        demo.val_x[:40], demo.val_y[:40], num_classes=10, description="tiny demo", is_demo=True)


def config(**kw):
    return TrainConfig(**{**dict(epochs=2, batch_size=64, lr=3e-3, pictures=False, patience=None), **kw})


def trainer(dataset, out, seed=0, **kw):
    return Trainer(VAE(784, (16,), 2, seed=seed), dataset, config(**kw), out, progress=False, echo=lambda _: None)


def test_every_optimizer_setting_is_a_config_field():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in optim.hyperparameter_names():
        assert name in fields, f"optimizer option {name!r} has no TrainConfig field"
    for name in NEW_FIELDS:
        assert fields[name].metadata.get("help"), name


@pytest.mark.parametrize(
    "kw, cls, expected",
    [
        (dict(optimizer="rmsprop", momentum=0.5), optim.RMSprop, dict(alpha=0.99, eps=1e-8, momentum=0.5)),
        (dict(optimizer="rmsprop", rho=0.9, epsilon=1e-6, centered=True), optim.RMSprop,
         dict(alpha=0.9, eps=1e-6, centered=True)),
        (dict(optimizer="keras-rmsprop"), optim.KerasRMSprop, dict(rho=0.9, epsilon=1e-7, momentum=0.0)),
        (dict(optimizer="keras-adam", beta2=0.99, amsgrad=True), optim.KerasAdam,
         dict(beta1=0.9, beta2=0.99, eps=1e-7, amsgrad=True)),
        (dict(optimizer="adamw"), optim.AdamW, dict(weight_decay=0.0, eps=1e-8)),  # TrainConfig's 0, as before
        (dict(optimizer="adam", momentum=0.5), optim.Adam, dict(eps=1e-8)),  # momentum ignored, as before
        (dict(optimizer="sgd", momentum=0.9, nesterov=True), optim.SGD, dict(momentum=0.9, nesterov=True)),
    ],
)
def test_trainer_builds_the_named_optimizer(tiny_dataset, tmp_path, kw, cls, expected):
    t = trainer(tiny_dataset, tmp_path, **kw)
    assert type(t.optimizer) is cls and t.optimizer.lr == 3e-3
    for name, value in expected.items():
        assert getattr(t.optimizer, name) == value, name


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(optimizer="adam", rho=0.9), "optimizer adam takes no rho"),
        (dict(optimizer="keras-rmsprop", amsgrad=True), "optimizer keras-rmsprop takes no amsgrad"),
        (dict(optimizer="rmsprop", momentum=1.0), r"momentum a finite number in \[0, 1\)"),  # any optimizer's
        (dict(optimizer="keras-adam", beta1=1.0), "expected beta1"),
        (dict(optimizer="sgd", nesterov=True), "Nesterov momentum needs momentum > 0"),
        (dict(optimizer="adam", amsgrad="yes"), "expected amsgrad to be True or False"),
        (dict(optimizer="lbfgs"), "unknown optimizer 'lbfgs': expected one of sgd, rmsprop, adam, adamw, keras"),
        (dict(momentum=-0.5), r"momentum a finite number in \[0, 1\)"),
    ],
)
def test_config_refuses_bad_optimizer_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw).validate()


def interrupted_then_resumed(dataset, tmp_path, rewrite=None, **kw):
    """Train 2 epochs straight, and again stopped after step 3, (rewritten,) resumed: both final parameters."""
    straight = trainer(dataset, tmp_path / "straight", **kw)
    straight.run()
    first = trainer(dataset, tmp_path / "resumed", **kw)
    step = first._train_step

    def stop_after_three(idx):
        terms = step(idx)
        if first.step == 3:
            first._interrupted = True
        return terms

    first._train_step = stop_after_three
    assert first.run().stopped == "interrupted"
    if rewrite is not None:
        path = tmp_path / "resumed" / "checkpoint.npz"
        arrays, meta = load_checkpoint(path)
        save_checkpoint(path, arrays, rewrite(meta))
    resumed = trainer(dataset, tmp_path / "resumed", seed=99, **kw)
    assert resumed.run(resume=True).stopped == "completed"
    return straight.model.params.data, resumed.model.params.data


def as_written_before(meta):
    """A checkpoint as the trainer wrote it before the optimizer settings existed (same optimizer state)."""
    meta["train_config"] = {k: v for k, v in meta["train_config"].items() if k not in NEW_FIELDS}
    return meta


@pytest.mark.parametrize("kw", [dict(optimizer="rmsprop", momentum=0.5), dict(optimizer="adamw"), dict()],
                         ids=["rmsprop", "adamw", "adam"])
def test_a_run_saved_before_the_settings_resumes_bit_identically(tiny_dataset, tmp_path, kw):
    straight, resumed = interrupted_then_resumed(tiny_dataset, tmp_path, rewrite=as_written_before, **kw)
    np.testing.assert_array_equal(resumed, straight)
    _, meta = load_checkpoint(tmp_path / "resumed" / "checkpoint.npz")
    check_run_meta(as_written_before(meta), "old")  # and reads back as a valid run


@pytest.mark.parametrize("kw", [dict(optimizer="keras-rmsprop", momentum=0.5, centered=True),
                                dict(optimizer="keras-adam", amsgrad=True, beta1=0.8)], ids=["keras-rmsprop", "keras-adam"])
def test_keras_conventions_resume_bit_identically(tiny_dataset, tmp_path, kw):
    straight, resumed = interrupted_then_resumed(tiny_dataset, tmp_path, **kw)
    np.testing.assert_array_equal(resumed, straight)
    _, meta = load_checkpoint(tmp_path / "resumed" / "checkpoint.npz")
    assert meta["train_config"]["optimizer"] == kw["optimizer"]
    assert meta["optimizer_scalars"]["epsilon" if kw["optimizer"] == "keras-rmsprop" else "eps"] == 1e-7


FASHION = Path("/work/shared/data/fashion-mnist")


@pytest.mark.slow
def test_keras_conv_vae_diverges_under_torch_rmsprop_and_trains_under_keras():
    """The write-up's conv VAE (latent 2, KL weight 0.392, batch 16, lr 1e-3) on 64 Fashion-MNIST images:
    torch's RMSprop (alpha 0.99) blows up at step 2, Keras' (rho 0.9, epsilon inside the root) trains,
    and so does torch's rule with rho 0.9 (the decay decides it; scripts/optimizer_conventions.py)."""
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"no Fashion-MNIST files at {FASHION}")
    script = load_script("optimizer_conventions")
    images, _ = data.load_mnist_like("fashion-mnist", "train", data_dir=FASHION, download=False)
    x = (images[:64].reshape(64, 784) / np.float32(255)).astype(np.float32)
    torch_rms = script.losses("rmsprop", {}, x, steps=2)
    assert 400 < torch_rms[0] < 700 and torch_rms[1] > 1e6 * torch_rms[0]
    for name, settings in (("keras-rmsprop", {}), ("rmsprop", {"rho": 0.9})):
        trace = script.losses(name, settings, x, steps=8)
        assert trace[0] == torch_rms[0]  # same initialisation, batch and noise
        assert max(trace) < 2 * trace[0] and np.mean(trace[4:]) < np.mean(trace[:4]), (name, trace)
