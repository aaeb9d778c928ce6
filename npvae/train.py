"""The training loop: one loop for every model, resumable, atomic, and loud about divergence.

The loop knows nothing about which model it trains. It calls its objective's public
``loss_and_grads(model, x, y, rng=..., target=..., check=False)`` (:class:`npvae.objectives.Objective`;
the default is the model's own ``loss_and_grads``), which fills ``model.params.grad`` (the whole
arrays are checked once up front), steps an optimizer on the flat parameter buffer, and each
epoch evaluates, logs, checkpoints and draws pictures.

Reproducibility: the batch order of epoch ``e`` comes from ``default_rng([seed, e])`` and the noise
(eps, dynamic binarization, corruption) from a generator seeded ``[seed, e, 1]`` whose state is saved
in every checkpoint, so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import backend, data as datasets
from .checkpoint import CheckpointError, load_checkpoint, npvae_member, save_checkpoint
from .models import GaussianLatent, LossNames, Model
from .models.saving import model_meta, model_state, save_model
from .objectives import TRAINING_OBJECTIVES, Objective, estimator_help, trainable
from .optim import OPTIMIZERS, clip_grad_norm, hyperparameter_names
from .registry import option
from .rundir import (OutputError, RunLock, append_log, check_writable, claim_outputs, describe_removed, reconcile_log,
                     upgrade_record)

BINARIZATIONS = ("none", "static", "dynamic")  # none, one fixed Bernoulli draw, a fresh draw per use
CHECKPOINT = "checkpoint.npz"
BEST = "best.npz"
LOG = "log.jsonl"


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN or Inf; the last good checkpoint is kept."""


class _StopRequested(Exception):
    """Raised between steps after Ctrl-C or SIGTERM, when the state is consistent and can be saved."""


class Terminated(BaseException):
    """SIGTERM where npvae cannot stop gracefully (a second SIGTERM, or outside training's loop).

    A BaseException, like KeyboardInterrupt, so ``finally`` blocks (temporary files) run on the way out.
    """

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def raise_on_sigterm(signum, frame):
    """A SIGTERM handler that unwinds the stack (so temporary files are removed) instead of dying at once."""
    raise Terminated(signum)


def _is_integer(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


@dataclass
class TrainConfig:
    # Each field is one ``npvae train`` option (see npvae.registry.option): ``bounds`` for whole numbers,
    # ``const`` for switches (the value the flag sets), ``none_as`` the flag value that means None,
    # ``resumable`` for what a resumed run may change.
    epochs: int = option(10, "passes over the training set (default: 10, or 50 on the demo digits)",
                         bounds=(1, 1_000_000), resumable=True)
    batch_size: int = option(128, "examples per step", bounds=(1, 1_000_000))
    lr: float = option(1e-3, "learning rate")
    optimizer: str = option("adam", "the optimizer: PyTorch's conventions, or Keras' as keras-*",
                            choices=tuple(OPTIMIZERS))
    weight_decay: float = option(0.0, "L2 penalty (adam, sgd, rmsprop) or decoupled weight decay (adamw, keras-*)")
    momentum: float = option(0.0, "momentum, for sgd, rmsprop and keras-rmsprop, in [0, 1)")
    # The optimizer's other hyperparameters (npvae.optim's option names). None takes the optimizer's own
    # default, so a run saved before these fields existed resumes with exactly the optimizer it had.
    rho: float | None = option(None, "RMSprop's squared-gradient decay, in [0, 1) (torch's alpha; default: the "
                                     "optimizer's, 0.99 for rmsprop, 0.9 for keras-rmsprop)")
    epsilon: float | None = option(None, "the optimizer's epsilon, added where its convention adds it (default: the "
                                         "optimizer's, 1e-8 for PyTorch's, 1e-7 for Keras')")
    beta1: float = option(0.9, "Adam's first-moment decay, in [0, 1)")
    beta2: float = option(0.999, "Adam's second-moment decay, in [0, 1)")
    amsgrad: bool = option(False, "Adam: divide by the running maximum of the second moment")
    centered: bool = option(False, "RMSprop: divide by the gradient's estimated standard deviation")
    nesterov: bool = option(False, "SGD: Nesterov momentum (needs momentum > 0)")
    dampening: float = option(0.0, "SGD: dampening of the momentum average, in [0, 1]")
    loss_scale: float = option(1.0, "the optimizer steps on the gradient of LOSS_SCALE x the loss npvae reports (a "
                               "per-image sum): 1/784 is a Keras or PyTorch loss averaged over 28x28 pixels. Adam and "
                               "RMSprop change with it only through their epsilon; SGD's step by the factor",
                               metavar="LOSS_SCALE")
    clip_grad_norm: float | None = option(None, "clip the global gradient norm to MAX (default: no clipping)",
                                          metavar="MAX")
    binarize: str = option("none", "binarize the images: one fixed Bernoulli draw (static) or a fresh one per "
                           "batch (dynamic)", choices=BINARIZATIONS)
    kl_warmup_epochs: float = option(0.0, "epochs over which the KL weight rises from 0 to beta", flag="--kl-warmup",
                                     metavar="EPOCHS")
    patience: int | None = option(5, "early stopping patience in epochs: stop after this many without a better "
                                  "validation loss (never: 0 on the command line, None in a config)",
                                  bounds=(0, 1_000_000), none_as=0, resumable=True)
    seed: int = option(0, "seeds the initialisation, the split, the batches and the noise", bounds=(0, 2**63 - 1))
    limit: int | None = option(None, "train on the first N training examples only, for a quick try (validation "
                               "and test sets unchanged; default: all)", bounds=(1, 10**9), metavar="N")
    pictures: bool = option(True, "no pictures each epoch (they need matplotlib)", flag="--no-pictures", const=False,
                            resumable=True)
    log_grad_norms: bool = option(False, "log per-layer gradient norms to log.jsonl (every grad_norm_every steps)",
                                  const=True, resumable=True)
    grad_norm_every: int = option(50, "steps between gradient-norm records", cli=False)
    eval_batch_size: int = option(1000, "batch size of evaluation passes", cli=False)
    objective: str = option(Objective.name, "vae: the training bound, the ELBO or the importance-weighted bound of "
                            "--k samples", choices=tuple(TRAINING_OBJECTIVES))
    k: int = option(Objective.k, "samples of z per image for --objective", bounds=(1, 10_000))
    estimator: str = option(Objective.estimator, estimator_help(), choices=trainable())
    # What the run follows (npvae.recipes), recorded for ``npvae info``; set by ``npvae train --recipe``.
    recipe: str | None = option(None, "the write-up recipe the run follows (npvae recipes)", cli=False)
    departures: str | None = option(None, "the options given that depart from the recipe, as the run printed them",
                                    cli=False)

    def optimizer_options(self):
        """The hyperparameters of the optimizer these settings name: its defaults, overridden by the fields
        set here (:class:`npvae.optim.OptimizerOptions`, checked: one-line ValueError or TypeError)."""
        entry = OPTIMIZERS[self.optimizer]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        settings = {}
        for name in hyperparameter_names():
            value = getattr(self, name)
            if name in entry.option_names:
                if value is not None:
                    settings[name] = value
            # A setting this optimizer does not take is an error unless left at its default; momentum was
            # accepted and ignored by adam and adamw before, so runs saved with it still load.
            elif value is not None and value != defaults[name] and name != "momentum":
                settings[name] = value
        return entry.options_from(settings)

    def training_objective(self):
        """The :class:`npvae.objectives.Objective` these settings name (checked)."""
        return Objective(self.objective, self.k, self.estimator)

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range (NaN and infinities included)."""

        def check(name, ok, expected):
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"expected {name} {expected}, got {value!r}")

        def integer(lo):
            return lambda v: _is_integer(v) and v >= lo

        def number(ok):
            return lambda v: _is_number(v) and math.isfinite(v) and ok(v)

        check("epochs", integer(1), "an integer >= 1")
        check("batch_size", integer(1), "an integer >= 1")
        check("eval_batch_size", integer(1), "an integer >= 1")
        check("grad_norm_every", integer(1), "an integer >= 1")
        check("seed", integer(0), "an integer >= 0")
        if self.limit is not None:
            check("limit", integer(1), "an integer >= 1 or None")
        check("lr", number(lambda v: v > 0), "a positive finite number")
        check("weight_decay", number(lambda v: v >= 0), "a finite number >= 0")
        check("momentum", number(lambda v: 0 <= v < 1), "a finite number in [0, 1)")
        check("kl_warmup_epochs", number(lambda v: v >= 0), "a finite number >= 0")
        check("loss_scale", number(lambda v: v > 0), "a positive finite number")
        for name in ("recipe", "departures"):
            check(name, lambda v: v is None or isinstance(v, str), "a string or None")
        try:
            self.optimizer_options()
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        if self.binarize not in BINARIZATIONS:
            raise ValueError(f"expected binarize one of {', '.join(BINARIZATIONS)}, got {self.binarize!r}")
        if self.clip_grad_norm is not None:
            check("clip_grad_norm", number(lambda v: v > 0), "a positive finite number or None")
        if self.patience is not None:
            check("patience", integer(1), "an integer >= 1 or None")
        for name in ("pictures", "log_grad_norms"):
            check(name, lambda v: isinstance(v, bool), "True or False")
        self.training_objective()


@dataclass
class TrainResult:
    history: list  # one dict per epoch (the log's epoch records)
    stopped: str  # "completed", "early_stopping", "interrupted"
    out_dir: Path
    best_val_loss: float
    signal: int | None = None  # the signal that interrupted the run (SIGINT or SIGTERM), if one did


# ----------------------------------------------------------------------------- data preparation


def prepare_split(images: np.ndarray, model: Model, binarize: str, seed: int, name: str = "x") -> np.ndarray:
    """Images (N, ...) -> floats in the model's value range; binarized once unless 'none'.

    uint8 images are scaled from [0, 255]; floats must already lie in the model's range. Validation
    and test sets are binarized statically (one fixed draw) for both 'static' and 'dynamic' training,
    the usual protocol for dynamically binarized MNIST (binarizing needs a model of data in [0, 1]).
    """
    if binarize != "none":
        x = datasets.to_model_range(images, (0.0, 1.0), model.dtype, name=name)
        return datasets.binarize_static(x, np.random.default_rng([seed, 7]))
    return datasets.to_model_range(images, model.value_range, model.dtype, name=name)


# ----------------------------------------------------------------------------- saving and loading


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _restore_rng(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


_EPOCH_NUMBERS = {"epoch", "step", "train_loss", "train_recon", "train_reg", "val_loss", "val_recon", "val_reg",
                  "reg_weight", "seconds", "images_per_second"}


def check_run_meta(meta: dict, path, training: bool = True) -> dict:
    """Check the types of a run's metadata before anything reads it; return ``meta``.

    A checkpoint is data from disk: a list where an object belongs, a short list, a string where a
    number belongs must be one :class:`CheckpointError`, never an AttributeError deep in the trainer.
    ``training`` adds the fields a resume needs (position, RNG state, history, running sums).
    """

    def bad(key, expected):
        raise CheckpointError(f"{path}: metadata {key!r} should be {expected}, got {meta.get(key)!r:.80}")

    def is_int(v):
        return _is_integer(v) and v >= 0

    is_number = _is_number

    for key in ("train_config", "data_source"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            bad(key, "an object")
    if meta.get("train_config") is None and "train_config" in meta:
        del meta["train_config"]  # readers default a missing one
    config = meta.get("train_config") or {}
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise CheckpointError(f"{path}: metadata 'train_config' has unknown settings {', '.join(unknown)}")
    try:
        TrainConfig(**{**dataclasses.asdict(TrainConfig()), **config}).validate()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: metadata 'train_config' is not usable: {exc}") from None
    source = meta.get("data_source") or {}
    if source and source.get("kind") not in ("builtin", "path"):
        raise CheckpointError(f"{path}: metadata 'data_source' has kind {source.get('kind')!r:.40}, expected "
                              "'builtin' or 'path'")
    for key in ("name", "path", "target", "data_dir"):
        if source.get(key) is not None and not isinstance(source[key], str):
            raise CheckpointError(f"{path}: metadata 'data_source' field {key!r} should be a string")
    if meta.get("dataset") is not None and not isinstance(meta["dataset"], str):
        bad("dataset", "a string")
    for key in ("epoch", "step"):
        if meta.get(key) is not None and not is_int(meta[key]):
            bad(key, "an integer >= 0")
    for key in ("best_val_loss", "val_loss"):
        if meta.get(key) is not None and not is_number(meta[key]):
            bad(key, "a number or null")
    history = meta.get("history", [])
    if not (isinstance(history, list) and all(isinstance(r, dict) for r in history)):
        bad("history", "a list of objects")
    meta["history"] = history = [upgrade_record(r) for r in history]  # records from before the renames
    for i, record in enumerate(history):  # the fields reports format as numbers
        for key in _EPOCH_NUMBERS.intersection(record):
            if record[key] is not None and not is_number(record[key]):
                raise CheckpointError(f"{path}: metadata 'history' record {i}: {key!r} should be a number, got "
                                      f"{record[key]!r:.80}")
    if not training:
        return meta
    for key in ("epoch", "batch", "step"):
        if not is_int(meta.get(key)):
            bad(key, "an integer >= 0")
    for key in ("bad_epochs", "epoch_seen"):
        if key in meta and not is_int(meta[key]):
            bad(key, "an integer >= 0")
    if not isinstance(meta.get("rng_state"), dict):
        bad("rng_state", "an object")
    sums = meta.get("epoch_sums", [0.0, 0.0, 0.0])
    if not (isinstance(sums, list) and len(sums) == 3 and all(is_number(v) for v in sums)):
        bad("epoch_sums", "a list of 3 numbers")
    if not isinstance(meta.get("optimizer_scalars", {}), dict):
        bad("optimizer_scalars", "an object")
    return meta


# ----------------------------------------------------------------------------- the trainer


COMPILE_NOTICE_S = 3.0  # kernels not ready after this long are compiling (a cache load takes about 0.5 s)


class Trainer:
    """Trains any npvae model on a :class:`npvae.data.Dataset`.

    Parameters
    ----------
    model : Model
    dataset : npvae.data.Dataset
    config : TrainConfig
    out_dir : path
        Receives ``checkpoint.npz`` (latest, resumable), ``best.npz`` (best validation loss),
        ``log.jsonl`` and the pictures.
    progress : bool
        Show a progress bar (tqdm when installed, else one line per epoch).
    echo : callable
        Where human-readable lines go (default: print to stdout).
    """

    def __init__(self, model: Model, dataset, config: TrainConfig, out_dir, progress: bool = True,
                 echo: Callable[[str], None] = print):
        config.validate()
        self.model, self.dataset, self.config = model, dataset, config
        self.objective = config.training_objective()
        self.out_dir = Path(out_dir)
        self.progress, self.echo = progress, echo
        if config.binarize != "none" and tuple(model.value_range) != (0.0, 1.0):
            raise ValueError(f"binarize={config.binarize!r} needs a model of data in [0, 1]; "
                             f"{model.kind} models data in {list(model.value_range)}")
        self.optimizer = OPTIMIZERS[config.optimizer].build(model.params.data, model.params.grad, config.lr,
                                                            config.optimizer_options())
        if config.limit is not None and config.limit < len(dataset.train_x):  # the split is shuffled: a fair subset
            n = config.limit
            dataset = dataclasses.replace(
                dataset, train_x=dataset.train_x[:n], train_y=None if dataset.train_y is None else dataset.train_y[:n],
                train_target=None if dataset.train_target is None else dataset.train_target[:n],
                description=f"{dataset.description}; training on its first {n:,} examples (limit)")
            self.dataset = dataset
        self.train_x = prepare_split(dataset.train_x, model, "none" if config.binarize == "dynamic" else config.binarize, config.seed)
        self.val_x = prepare_split(dataset.val_x, model, config.binarize, config.seed + 1)
        # viewed in the model's shape: (N, 28, 28) images train a (784,) model and (N, 784) rows a (28, 28) one
        self.train_x = model.check_input(self.train_x, "the training data")
        self.val_x = model.check_input(self.val_x, "the validation data")
        # the labels the model reads: None for unconditional models, checked labels for conditional ones
        self.train_y = model.check_labels(dataset.train_y, len(self.train_x), "the training labels")
        self.val_y = model.check_labels(dataset.val_y, len(self.val_x), "the validation labels")
        self.val_labels = dataset.val_y  # for pictures
        self.train_target = self._prepare_target(dataset.train_target, config.seed)
        self.val_target = self._prepare_target(dataset.val_target, config.seed + 1)
        self.train_target = model.check_target(self.train_target, self.train_x)
        self.val_target = model.check_target(self.val_target, self.val_x)
        self.objective.check(model, paired=self.train_target is not None, kl_warmup=config.kl_warmup_epochs)
        self.n = len(self.train_x)
        self.steps_per_epoch = math.ceil(self.n / config.batch_size)
        # Position and state, all saved in checkpoints.
        self.epoch = 0  # epochs completed
        self.batch = 0  # batches completed within the current epoch
        self.step = 0  # optimizer steps in total
        self.rng = np.random.default_rng([config.seed, 0, 1])
        self.history: list[dict] = []
        self.best_val = math.inf
        self.bad_epochs = 0
        self.sums = np.zeros(3)  # running sums of (total, recon, kl) x batch size this epoch
        self.seen = 0
        self._interrupted: int | None = None  # the signal that asked training to stop
        self._saved_epoch = 0
        self.resumed_changes: dict = {}  # settings a resumed run changed ({name: [old, new]}), logged
        self.overwrite = False  # a new run may remove another run's outputs from out_dir (else it refuses)
        self._warned_pictures = False
        self._hinted_tqdm = False
        self.pictures_written: list[Path] = []  # the pictures of the last epoch that drew them
        self._batch_buf: dict[tuple, np.ndarray] = {}

    def _prepare_target(self, target, seed: int):
        """Paired training's targets in the model's range (None when the model reconstructs its input)."""
        if target is None:
            return None
        binarize = "none" if self.config.binarize == "dynamic" else self.config.binarize
        return prepare_split(target, self.model, binarize, seed, name="target")

    # -- checkpoints

    def _state(self) -> tuple[dict, dict]:
        arrays = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        optim_scalars = {}
        for k, v in self.optimizer.state_dict().items():
            if isinstance(v, np.ndarray) and v.ndim > 0:
                arrays[f"optim/{k}"] = v
            else:
                optim_scalars[k] = v.item() if isinstance(v, np.generic | np.ndarray) else v
        meta = {
            **model_meta(self.model),
            "train_config": dataclasses.asdict(self.config),
            "dataset": self.dataset.name,
            "dataset_description": self.dataset.description,
            "data_source": self.dataset.source,
            "backend": backend.get_backend(),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "rng_state": _rng_state(self.rng),
            "history": self.history,
            "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
            "bad_epochs": self.bad_epochs,
            "epoch_sums": self.sums.tolist(),
            "epoch_seen": self.seen,
            "optimizer_scalars": optim_scalars,
        }
        return arrays, meta

    def save(self, path=None) -> Path:
        arrays, meta = self._state()
        return save_checkpoint(path or self.out_dir / CHECKPOINT, arrays, meta)

    def _save_checkpoint(self) -> None:
        self._output(self.save, what=CHECKPOINT)
        self._saved_epoch = self.epoch if self.batch == 0 else f"{self.epoch + 1}, batch {self.batch}"

    def restore(self, path) -> None:
        """Continue from a training checkpoint: parameters, optimizer, position and noise state."""
        arrays, meta = load_checkpoint(path, npvae_member)
        check_run_meta(meta, path)
        ours = json.loads(json.dumps(model_meta(self.model)))
        same = (meta.get("model_spec") == ours["model_spec"] if "model_spec" in meta
                else (meta.get("model"), meta.get("model_config")) == (ours["model"], ours["model_config"]))
        if not same:
            raise CheckpointError(f"{path}: checkpoint is for {meta.get('model')} {meta.get('model_config')}, "
                             f"not this {self.model!r}; resume with the same model options")
        saved = meta.get("train_config") or {}
        theirs = Objective.from_config(saved)
        if theirs != self.objective:
            raise ValueError(f"{path}: the run trained on the {theirs.describe()}, not the {self.objective.describe()}; "
                             "resume with the same objective, k and estimator")
        self.model.load_state_dict(model_state(arrays, meta))
        optim = {k[6:]: v for k, v in arrays.items() if k.startswith("optim/")}
        optim.update(meta.get("optimizer_scalars", {}))
        try:
            self.optimizer.load_state_dict(optim)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: optimizer state does not fit: {exc}") from None
        self.epoch, self.batch, self.step = int(meta["epoch"]), int(meta["batch"]), int(meta["step"])
        try:
            self.rng = _restore_rng(meta["rng_state"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CheckpointError(f"{path}: metadata 'rng_state' is not a NumPy generator state: {exc}") from None
        self.history = list(meta.get("history", []))  # check_run_meta above read it under today's names
        best = meta.get("best_val_loss")
        self.best_val = math.inf if best is None else float(best)
        self.bad_epochs = int(meta.get("bad_epochs", 0))
        self.sums = np.array(meta.get("epoch_sums", [0.0, 0.0, 0.0]))
        self.seen = int(meta.get("epoch_seen", 0))
        self._saved_epoch = self.epoch if self.batch == 0 else f"{self.epoch + 1}, batch {self.batch}"

    # -- logging

    def _log(self, record: dict) -> None:
        self._output(append_log, self.out_dir / LOG, record, what="the log")

    def _output(self, write, *args, what: str):
        """Run one write into the run directory; an OS error (disk full, permissions) becomes one
        :class:`OutputError` line that says what was kept."""
        try:
            return write(*args)
        except OSError as exc:
            ckpt = self.out_dir / CHECKPOINT
            kept = (f"the last good checkpoint is {ckpt} (epoch {self._saved_epoch})" if ckpt.exists()
                    else "no checkpoint was saved")
            raise OutputError(exc.errno, f"could not write {what} in {self.out_dir}: "
                                         f"{exc.strerror or exc}; {kept}") from None

    # -- one step

    def _reg_weight(self) -> float | None:
        """The KL weight of this step (beta, annealed during warm-up); None for models without a KL."""
        if not isinstance(self.model, GaussianLatent):
            return None
        beta = self.model.config.beta
        warm = self.config.kl_warmup_epochs
        if warm <= 0:
            return beta
        return beta * min(1.0, self.step / (warm * self.steps_per_epoch))

    def _gather(self, source: np.ndarray, idx: np.ndarray, name: str) -> np.ndarray:
        """Rows ``idx`` of ``source`` in a buffer reused per batch size."""
        key = (name, len(idx))
        buf = self._batch_buf.get(key)
        if buf is None:
            buf = self._batch_buf[key] = np.empty((len(idx), *source.shape[1:]), source.dtype)
        np.take(source, idx, axis=0, out=buf, mode="clip")  # "raise" would buffer a copy
        return buf

    def _batch(self, idx: np.ndarray) -> np.ndarray:
        buf = self._gather(self.train_x, idx, "x")
        if self.config.binarize == "dynamic":
            datasets.binarize_dynamic(buf, self.rng, out=buf)
        return buf

    def _check_finite(self, terms) -> None:
        bad = None
        for name in ("recon", "reg"):
            if not math.isfinite(getattr(terms, name)):
                bad = f"the {name} loss ({getattr(terms, name)})"
                break
        grad = self.model.params.grad
        if bad is None and not math.isfinite(float(np.dot(grad, grad))):
            for key, g in self.model.gradients().items():
                if not np.isfinite(g).all():
                    bad = f"the gradient of {key}"
                    break
            else:
                return  # finite but huge: the squared norm overflowed, clipping handles it
        if bad is not None:
            ckpt = self.out_dir / CHECKPOINT
            kept = (f"The last good checkpoint is {ckpt} (epoch {self._saved_epoch})." if ckpt.exists()
                    else "No checkpoint was saved before it.")
            raise TrainingDiverged(
                f"training diverged at step {self.step} (epoch {self.epoch + 1}, batch {self.batch + 1}): "
                f"{bad} is not finite. {kept} Try a lower --lr, --clip-grad-norm, or --kl-warmup."
            )

    def _grad_norm_record(self) -> dict:
        record = {"event": "grad_norms", "step": self.step, "epoch": self.epoch + 1}
        for key, g in self.model.gradients().items():
            if key.endswith(".weight"):
                record[key[: -len(".weight")]] = float(np.linalg.norm(g))
        return record

    def _train_step(self, idx: np.ndarray):
        model = self.model
        x = self._batch(idx)
        y = None if self.train_y is None else self.train_y[idx]
        target = None if self.train_target is None else self._gather(self.train_target, idx, "target")
        if isinstance(model, GaussianLatent):
            model.reg_weight = self._reg_weight()
        terms, _ = self.objective.loss_and_grads(model, x, y, rng=self.rng, target=target, check=False)
        self._check_finite(terms)
        if self.config.loss_scale != 1.0:  # skipped at 1: a run without it stays bit-identical
            model.params.grad *= model.dtype.type(self.config.loss_scale)
        if self.config.log_grad_norms and self.step % self.config.grad_norm_every == 0:
            self._log(self._grad_norm_record())
        if self.config.clip_grad_norm is not None:
            clip_grad_norm(model.params.grad, self.config.clip_grad_norm)
        self.optimizer.step()
        self.step += 1
        self.batch += 1
        return terms

    # -- epochs

    def evaluate(self, x, y, rng, target=None) -> dict:
        """The model's mean loss over a whole set (labels y and targets as the model reads them)."""
        terms = self.model.evaluate(x, y, rng=rng, target=target, batch_size=self.config.eval_batch_size)
        return {"loss": terms.total, "recon": terms.recon, "reg": terms.reg, "se": terms.se}

    def _progress_bar(self):
        if not self.progress:
            return None
        try:
            from tqdm import tqdm
        except ImportError:  # the minimal install: one line per epoch, and once, how to get a bar
            if not self._hinted_tqdm:
                self.echo("(pip install tqdm for a progress bar within each epoch)")
                self._hinted_tqdm = True
            return None
        return tqdm(total=self.steps_per_epoch, initial=self.batch, desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                    unit="batch", leave=True, dynamic_ncols=True, file=sys.stderr)

    def _warm_up_kernels(self) -> None:
        """Numba compiles each kernel on its first call: tens of seconds on a first run, about a second
        once its on-disk cache (``cache=True``) holds them. Call the kernels of a training step, an
        optimizer step and an evaluation here, before any epoch's clock starts, so that compiling counts
        in neither the progress bar's ETA nor the epoch's images per second; say so when it takes long.

        The run's numbers do not change: the step draws from its own generator, its gradients are
        overwritten by the first real step, and the optimizer that steps is a throwaway over copies.
        """
        if backend.get_backend() != "numba":
            return
        import threading

        cfg, model = self.config, self.model
        said = threading.Event()

        def say():
            said.set()
            self.echo("compiling kernels (once per install, ~30 s) ...")

        timer = threading.Timer(COMPILE_NOTICE_S, say)
        timer.daemon = True
        start = time.perf_counter()
        timer.start()
        try:
            rows = slice(0, 2)
            rng = np.random.default_rng(0)
            y = None if self.train_y is None else self.train_y[rows]
            target = None if self.train_target is None else self.train_target[rows]
            x = np.ascontiguousarray(self.train_x[rows])
            if isinstance(model, GaussianLatent):
                model.reg_weight = self._reg_weight()
            self.objective.loss_and_grads(model, x, y, rng=rng, target=target, check=False)
            grad = model.params.grad.copy()
            if cfg.clip_grad_norm is not None:
                clip_grad_norm(grad, cfg.clip_grad_norm)
            OPTIMIZERS[cfg.optimizer].build(model.params.data.copy(), grad, cfg.lr, cfg.optimizer_options()).step()
            if len(self.val_x):
                model.evaluate(self.val_x[rows], None if self.val_y is None else self.val_y[rows], rng=rng,
                               target=None if self.val_target is None else self.val_target[rows])
        finally:
            timer.cancel()
        if said.is_set():
            self.echo(f"kernels compiled in {time.perf_counter() - start:.0f} s (cached: later runs skip this)")

    def _run_epoch(self) -> dict:
        cfg = self.config
        perm = datasets.epoch_permutation(cfg.seed, self.epoch, self.n)
        bar = self._progress_bar()
        start = time.perf_counter()
        start_seen = self.seen
        try:
            while self.batch < self.steps_per_epoch:
                if self._interrupted:
                    raise _StopRequested
                idx = perm[self.batch * cfg.batch_size : (self.batch + 1) * cfg.batch_size]
                terms = self._train_step(idx)
                self.sums[0] += len(idx) * terms.total
                self.sums[1] += len(idx) * terms.recon
                self.sums[2] += len(idx) * terms.reg
                self.seen += len(idx)
                if bar is not None:
                    bar.update(1)
                    if self.batch % 10 == 0 or self.batch == self.steps_per_epoch:
                        bar.set_postfix(loss=f"{self.sums[0] / self.seen:.2f}", refresh=False)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        train = self.sums / max(self.seen, 1)
        val = self.evaluate(self.val_x, self.val_y, np.random.default_rng([cfg.seed, self.epoch, 2]), self.val_target)
        record = {
            "event": "epoch",
            "epoch": self.epoch + 1,
            "step": self.step,
            "train_loss": float(train[0]),
            "train_recon": float(train[1]),
            "train_reg": float(train[2]),
            "val_loss": val["loss"],
            "val_recon": val["recon"],
            "val_reg": val["reg"],
            "reg_weight": self._reg_weight(),
            "seconds": seconds,
            "images_per_second": (self.seen - start_seen) / max(seconds, 1e-9),  # a short last batch counts short
        }
        return record

    def _pictures(self, epoch: int) -> None:
        from .viz import figures

        try:
            self.pictures_written = figures.epoch_pictures(self.model, self.val_x, self.val_labels, self.out_dir, epoch,
                                                           seed=self.config.seed, dataset_name=self.dataset.name,
                                                           val_target=self.val_target)
        except (ImportError, OSError) as exc:  # matplotlib is an optional extra; a full disk spares the checkpoint
            if not self._warned_pictures:
                self.echo(f"pictures skipped: {exc}")
                self._warned_pictures = True

    def run(self, resume: bool = False) -> TrainResult:
        """Train until the configured epochs, early stopping, Ctrl-C or SIGTERM (which save and return).

        Each epoch writes ``best.npz`` (when validation improved), then ``checkpoint.npz``, then the
        log line, each atomically: killed at any point, the run leaves a checkpoint that resumes exactly,
        a ``best.npz`` no older than the best that checkpoint records (a resume re-trains the epoch in
        between bit for bit), and a log that is never ahead of the checkpoint (a resume restores a line
        it lacks).

        Raises
        ------
        RunLocked
            Another live process trains in ``out_dir``.
        OutputError
            ``out_dir`` cannot be written (checked before training), or a write failed later; the
            message says which checkpoint was kept.
        """
        check_writable(self.out_dir)
        with RunLock(self.out_dir):
            return self._run_locked(resume)

    def _run_locked(self, resume: bool) -> TrainResult:
        cfg = self.config
        ckpt = self.out_dir / CHECKPOINT
        if resume:
            if not ckpt.exists():
                raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
            self.restore(ckpt)
            self._output(reconcile_log, self.out_dir / LOG, self.history, self.step, what="the log")
            if self.resumed_changes:
                self._log({"event": "resume", "step": self.step, "epoch": self.epoch, "changed": self.resumed_changes})
            self.echo(f"resumed from {ckpt} at epoch {self.epoch + 1}, batch {self.batch} (step {self.step})")
        elif removed := claim_outputs(self.out_dir, self.overwrite):  # refuses another run's folder unless overwrite
            self.echo(describe_removed(removed, self.out_dir))
        stopped = "completed"
        restore_handlers = self._trap_stop_signals()
        # Overflow in the NumPy backend shows up as inf/nan, which _check_finite reports with the
        # step and the tensor; NumPy's own RuntimeWarnings would only repeat it less helpfully.
        errstate = np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore")
        errstate.__enter__()
        try:
            self._warm_up_kernels()
            while self.epoch < cfg.epochs:
                if self.batch == 0:
                    self.rng = np.random.default_rng([cfg.seed, self.epoch, 1])
                    self.sums[:] = 0
                    self.seen = 0
                record = self._run_epoch()
                self.epoch += 1
                self.batch = 0
                improved = record["val_loss"] < self.best_val
                if improved:
                    self.best_val = record["val_loss"]
                    self.bad_epochs = 0
                else:
                    self.bad_epochs += 1
                self.history.append(record)
                if improved:  # before the checkpoint that records it: best.npz is never the older one
                    self._output(save_model, self.model, self.out_dir / BEST, {
                        "epoch": self.epoch, "val_loss": record["val_loss"], "dataset": self.dataset.name,
                        "data_source": self.dataset.source,
                        "train_config": dataclasses.asdict(cfg),  # how to prepare data to evaluate it
                    }, what=BEST)
                self._save_checkpoint()
                self._log(record)  # after the checkpoint: the log never runs ahead of it
                self.echo(_epoch_line(record, cfg.epochs, self.model.loss_names, self.objective))
                if cfg.pictures:
                    self._pictures(self.epoch)
                if cfg.patience is not None and self.bad_epochs >= cfg.patience:
                    stopped = "early_stopping"
                    self.echo(f"early stopping: no better validation loss for {cfg.patience} epochs")
                    break
                if self._interrupted:  # asked during evaluation or pictures: the epoch is saved, stop here
                    raise _StopRequested
        except _StopRequested:
            if self.batch or not ckpt.exists():
                self._save_checkpoint()
            stopped = "interrupted"
            name = signal.Signals(self._interrupted).name
            where = f"epoch {self.epoch + 1}, batch {self.batch}" if self.batch else f"the end of epoch {self.epoch}"
            self.echo(f"interrupted by {name} at {where}: saved {ckpt}; continue with --resume")
        finally:
            errstate.__exit__(None, None, None)
            restore_handlers()
        self._log({"event": "end", "stopped": stopped, "step": self.step, "epoch": self.epoch})
        return TrainResult(self.history, stopped, self.out_dir, self.best_val,
                           signal=self._interrupted if stopped == "interrupted" else None)

    def _trap_stop_signals(self) -> Callable[[], None]:
        """Make Ctrl-C and SIGTERM finish the current step, then save and stop; a second one stops at
        once. Installed only in the main thread and over the default handlers (or npvae's own
        SIGTERM handler), never over a handler someone else set. Returns the undo."""
        if not _main_thread():
            return lambda: None

        def on_signal(signum, frame):
            if self._interrupted:  # a second signal stops at once, without saving a half-done step
                raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)
            self._interrupted = signum

        previous = {}
        for signum, ours in ((signal.SIGINT, (signal.default_int_handler,)),
                             (getattr(signal, "SIGTERM", None), (signal.SIG_DFL, raise_on_sigterm))):
            if signum is not None and signal.getsignal(signum) in ours:
                previous[signum] = signal.signal(signum, on_signal)

        def undo():
            for signum, handler in previous.items():
                signal.signal(signum, handler)

        return undo


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _epoch_line(r: dict, epochs: int, names, objective: Objective | None = None) -> str:
    """E.g. ``epoch 3/10  negative ELBO (nats): train 250.12 (recon 230.00, KL 20.12)  val ...``, in the
    model's own names (``names``, a :class:`~npvae.models.LossNames`). A k-sample objective trains on
    another bound than validation scores (the model's own loss): then each column says what it is."""
    seconds = f"  {r['seconds']:.1f}s, {r['images_per_second']:,.0f} img/s"
    if objective is not None and not objective.is_default:
        from .objectives import BOUNDS

        bound = LossNames(f"negative {BOUNDS[objective.name]} (k = {objective.k})", "weighted recon", "rest",
                          names.unit)
        return (f"epoch {r['epoch']}/{epochs}  train {bound.format(r['train_loss'], r['train_recon'], r['train_reg'])}"
                f"  val {names.format(r['val_loss'], r['val_recon'], r['val_reg'])}{seconds}")
    unit = f" ({names.unit})" if names.unit else ""
    return (f"epoch {r['epoch']}/{epochs}  {names.total}{unit}: train {r['train_loss']:.2f}"
            f"{names.parts(r['train_recon'], r['train_reg'])}  val {r['val_loss']:.2f}{names.parts(r['val_recon'], r['val_reg'])}"
            f"{seconds}")


# ----------------------------------------------------------------------------- one call for arrays


def fit(model: Model, x, y=None, *, target=None, x_val=None, y_val=None, target_val=None, epochs: int = 10,
        batch_size: int = 128, lr: float = 1e-3, val_fraction: float = 0.1, out_dir=None, seed: int = 0,
        progress: bool = False, echo: Callable[[str], None] | None = None, **options) -> TrainResult:
    """Train ``model`` on arrays, as Keras' ``model.fit`` or scikit-learn's ``fit`` would.

    Parameters
    ----------
    model : Model
        Any npvae model; its ``input_shape`` must match ``x.shape[1:]``.
    x : (N, ...) array
        uint8 images (scaled to the model's value range) or floats already in that range.
    y : (N,) integer array, optional
        Class labels (needed by conditional models; otherwise used only to stratify the split).
    target : (N, ...) array, optional
        What to reconstruct instead of ``x`` (paired training: noisy -> clean).
    x_val, y_val, target_val : arrays, optional
        A validation set; without one, ``val_fraction`` of x is held out (stratified by y).
    epochs, batch_size, lr, seed
        As in :class:`TrainConfig`; ``options`` sets any other :class:`TrainConfig` field
        (``optimizer``, ``patience``, ``kl_warmup_epochs``, ``pictures``, ...).
    out_dir : path, optional
        Where checkpoints, the log and pictures go; default a temporary folder, removed afterwards
        (pictures are then off unless asked for).
    progress : bool
        Show a progress bar.
    echo : callable, optional
        Receives one line per epoch (default: silent).

    Returns
    -------
    TrainResult
        ``result.history`` holds one dict per epoch (``train_loss``, ``val_loss``, ...). The model
        keeps the parameters of the last epoch.
    """
    import tempfile

    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise TypeError(f"fit() got unknown options {', '.join(unknown)}; see npvae.TrainConfig for the settings")
    dataset = datasets.Dataset.from_arrays(x, y, target, val_x=x_val, val_y=y_val, val_target=target_val,
                                           val_fraction=val_fraction, seed=seed)
    if out_dir is None:
        options.setdefault("pictures", False)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, **options)
    with tempfile.TemporaryDirectory(prefix="npvae-fit-") as scratch:
        trainer = Trainer(model, dataset, config, scratch if out_dir is None else out_dir, progress=progress,
                          echo=echo or (lambda line: None))
        result = trainer.run()
    if result.stopped == "interrupted":  # the trainer saved and stopped; a caller's Ctrl-C still stops the caller
        raise KeyboardInterrupt if result.signal == signal.SIGINT else Terminated(result.signal)
    return result if out_dir is not None else dataclasses.replace(result, out_dir=None)
