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
from .checkpoint import load_checkpoint, save_checkpoint
from .models import GaussianLatent, Model
from .models.saving import model_meta, model_state, save_model
from .objectives import Objective
from .optim import clip_grad_norm, make_optimizer

CHECKPOINT = "checkpoint.npz"
BEST = "best.npz"
LOG = "log.jsonl"


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN or Inf; the last good checkpoint is kept."""


class _StopRequested(Exception):
    """Raised between steps after a Ctrl-C, when the state is consistent and can be saved."""


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # examples per step
    lr: float = 1e-3  # learning rate
    optimizer: str = "adam"  # sgd | rmsprop | adam | adamw
    weight_decay: float = 0.0  # L2 (adam, sgd, rmsprop) or decoupled (adamw)
    momentum: float = 0.0  # sgd / rmsprop momentum
    clip_grad_norm: float | None = None  # clip the global gradient norm to this value
    binarize: str = "none"  # none | static (one fixed draw) | dynamic (fresh draw per use)
    kl_warmup_epochs: float = 0.0  # anneal the KL weight linearly from 0 to beta over this many epochs
    patience: int | None = 5  # stop after this many epochs without a better validation loss (None: never)
    seed: int = 0  # seeds the batch order, the noise and the model's initialisation
    pictures: bool = True  # write reconstructions and samples each epoch (needs matplotlib)
    log_grad_norms: bool = False  # log each layer's gradient norm (every grad_norm_every steps)
    grad_norm_every: int = 50  # steps between gradient-norm records
    eval_batch_size: int = 1000  # batch size of evaluation passes
    objective: str = "elbo"  # what training minimises: elbo | iwae (npvae.objectives)
    k: int = 1  # samples of z per example for the objective
    estimator: str = "reparam"  # its gradient estimator: reparam | stl | dreg (iwae only)

    def training_objective(self):
        """The :class:`npvae.objectives.Objective` these settings name (checked)."""
        return Objective(self.objective, self.k, self.estimator)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"expected epochs >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"expected batch_size >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"expected a positive finite lr, got {self.lr}")
        if self.binarize not in ("none", "static", "dynamic"):
            raise ValueError(f"expected binarize none, static or dynamic, got {self.binarize!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"expected clip_grad_norm > 0, got {self.clip_grad_norm}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"expected patience >= 1 or None, got {self.patience}")
        if self.kl_warmup_epochs < 0:
            raise ValueError(f"expected kl_warmup_epochs >= 0, got {self.kl_warmup_epochs}")
        self.training_objective()


@dataclass
class TrainResult:
    history: list  # one dict per epoch (the log's epoch records)
    stopped: str  # "completed", "early_stopping", "interrupted"
    out_dir: Path
    best_val_loss: float


# ----------------------------------------------------------------------------- data preparation


def prepare_split(images: np.ndarray, model: Model, binarize: str, seed: int) -> np.ndarray:
    """Images (N, ...) -> floats in the model's value range; binarized once unless 'none'.

    uint8 images are scaled from [0, 255]; floats must already lie in the model's range. Validation
    and test sets are binarized statically (one fixed draw) for both 'static' and 'dynamic' training,
    the usual protocol for dynamically binarized MNIST (binarizing needs a model of data in [0, 1]).
    """
    if binarize != "none":
        x = datasets.to_model_range(images, (0.0, 1.0), model.dtype)
        return datasets.binarize_static(x, np.random.default_rng([seed, 7]))
    return datasets.to_model_range(images, model.value_range, model.dtype)


# ----------------------------------------------------------------------------- saving and loading


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _restore_rng(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


# ----------------------------------------------------------------------------- the trainer


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
        kwargs = {"weight_decay": config.weight_decay}
        if config.optimizer in ("sgd", "rmsprop"):
            kwargs["momentum"] = config.momentum
        self.optimizer = make_optimizer(config.optimizer, model.params.data, model.params.grad, config.lr, **kwargs)
        self.train_x = prepare_split(dataset.train_x, model, "none" if config.binarize == "dynamic" else config.binarize, config.seed)
        self.val_x = prepare_split(dataset.val_x, model, config.binarize, config.seed + 1)
        model.check_input(self.train_x, "the training data")
        model.check_input(self.val_x, "the validation data")
        # the labels the model reads: None for unconditional models, checked labels for conditional ones
        self.train_y = model.check_labels(dataset.train_y, len(self.train_x), "the training labels")
        self.val_y = model.check_labels(dataset.val_y, len(self.val_x), "the validation labels")
        self.val_labels = dataset.val_y  # for pictures
        self.train_target = self._prepare_target(dataset.train_target, config.seed)
        self.val_target = self._prepare_target(dataset.val_target, config.seed + 1)
        model.check_target(self.train_target, self.train_x)
        model.check_target(self.val_target, self.val_x)
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
        self._interrupted = False
        self._warned_pictures = False
        self._batch_buf: dict[tuple, np.ndarray] = {}

    def _prepare_target(self, target, seed: int):
        """Paired training's targets in the model's range (None when the model reconstructs its input)."""
        if target is None:
            return None
        return prepare_split(target, self.model, "none" if self.config.binarize == "dynamic" else self.config.binarize, seed)

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

    def restore(self, path) -> None:
        """Continue from a training checkpoint: parameters, optimizer, position and noise state."""
        arrays, meta = load_checkpoint(path)
        ours = json.loads(json.dumps(model_meta(self.model)))
        same = (meta.get("model_spec") == ours["model_spec"] if "model_spec" in meta
                else (meta.get("model"), meta.get("model_config")) == (ours["model"], ours["model_config"]))
        if not same:
            raise ValueError(f"{path}: checkpoint is for {meta.get('model')} {meta.get('model_config')}, "
                             f"not this {self.model!r}; resume with the same model options")
        saved = meta.get("train_config") or {}
        theirs = Objective(saved.get("objective", "elbo"), saved.get("k", 1), saved.get("estimator", "reparam"))
        if theirs != self.objective:
            raise ValueError(f"{path}: the run trained on the {theirs.describe()}, not the {self.objective.describe()}; "
                             "resume with the same objective, k and estimator")
        self.model.load_state_dict(model_state(arrays, meta))
        optim = {k[6:]: v for k, v in arrays.items() if k.startswith("optim/")}
        optim.update(meta.get("optimizer_scalars", {}))
        self.optimizer.load_state_dict(optim)
        self.epoch, self.batch, self.step = int(meta["epoch"]), int(meta["batch"]), int(meta["step"])
        self.rng = _restore_rng(meta["rng_state"])
        self.history = list(meta.get("history", []))
        best = meta.get("best_val_loss")
        self.best_val = math.inf if best is None else float(best)
        self.bad_epochs = int(meta.get("bad_epochs", 0))
        self.sums = np.array(meta.get("epoch_sums", [0.0, 0.0, 0.0]))
        self.seen = int(meta.get("epoch_seen", 0))

    # -- logging

    def _log(self, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- one step

    def _kl_weight(self) -> float | None:
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
        for name in ("recon", "kl"):
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
            raise TrainingDiverged(
                f"training diverged at step {self.step} (epoch {self.epoch + 1}, batch {self.batch + 1}): "
                f"{bad} is not finite. The last good checkpoint is {self.out_dir / CHECKPOINT}. "
                "Try a lower --lr, --clip-grad-norm, or --kl-warmup."
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
            model.kl_weight = self._kl_weight()
        terms, _ = self.objective.loss_and_grads(model, x, y, rng=self.rng, target=target, check=False)
        self._check_finite(terms)
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
        return {"loss": terms.total, "recon": terms.recon, "kl": terms.kl}

    def _progress_bar(self):
        if not self.progress:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=self.steps_per_epoch, initial=self.batch, desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                    unit="batch", leave=True, dynamic_ncols=True, file=sys.stderr)

    def _run_epoch(self) -> dict:
        cfg = self.config
        perm = datasets.epoch_permutation(cfg.seed, self.epoch, self.n)
        bar = self._progress_bar()
        start = time.perf_counter()
        start_batch = self.batch
        try:
            while self.batch < self.steps_per_epoch:
                if self._interrupted:
                    raise _StopRequested
                idx = perm[self.batch * cfg.batch_size : (self.batch + 1) * cfg.batch_size]
                terms = self._train_step(idx)
                self.sums[0] += len(idx) * terms.total
                self.sums[1] += len(idx) * terms.recon
                self.sums[2] += len(idx) * terms.kl
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
            "train_kl": float(train[2]),
            "val_loss": val["loss"],
            "val_recon": val["recon"],
            "val_kl": val["kl"],
            "kl_weight": self._kl_weight(),
            "seconds": seconds,
            "images_per_second": (self.batch - start_batch) * cfg.batch_size / max(seconds, 1e-9),
        }
        return record

    def _pictures(self, epoch: int) -> None:
        from .viz import figures

        try:
            figures.epoch_pictures(self.model, self.val_x, self.val_labels, self.out_dir, epoch, seed=self.config.seed,
                                   dataset_name=self.dataset.name)
        except ImportError as exc:  # matplotlib is an optional extra
            if not self._warned_pictures:
                self.echo(f"pictures skipped: {exc}")
                self._warned_pictures = True

    def run(self, resume: bool = False) -> TrainResult:
        """Train until the configured epochs, early stopping, or Ctrl-C (which saves and returns)."""
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = self.out_dir / CHECKPOINT
        if resume:
            if not ckpt.exists():
                raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
            self.restore(ckpt)
            self.echo(f"resumed from {ckpt} at epoch {self.epoch + 1}, batch {self.batch} (step {self.step})")
        elif ckpt.exists():
            raise FileExistsError(f"{ckpt} exists: pass --resume to continue that run, or choose another --out")
        stopped = "completed"
        previous = signal.getsignal(signal.SIGINT)
        can_trap = previous is signal.default_int_handler and _main_thread()

        def on_sigint(signum, frame):
            if self._interrupted:  # a second Ctrl-C stops at once, without saving a half-done step
                raise KeyboardInterrupt
            self._interrupted = True  # finish this step, then save and stop

        if can_trap:
            signal.signal(signal.SIGINT, on_sigint)
        # Overflow in the NumPy backend shows up as inf/nan, which _check_finite reports with the
        # step and the tensor; NumPy's own RuntimeWarnings would only repeat it less helpfully.
        errstate = np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore")
        errstate.__enter__()
        try:
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
                self._log(record)
                self.echo(_epoch_line(record, cfg.epochs))
                self.save()
                if improved:
                    save_model(self.model, self.out_dir / BEST, {
                        "epoch": self.epoch, "val_loss": record["val_loss"], "dataset": self.dataset.name,
                        "data_source": self.dataset.source,
                        "train_config": dataclasses.asdict(cfg),  # how to prepare data to evaluate it
                    })
                if cfg.pictures:
                    self._pictures(self.epoch)
                if cfg.patience is not None and self.bad_epochs >= cfg.patience:
                    stopped = "early_stopping"
                    self.echo(f"early stopping: no better validation loss for {cfg.patience} epochs")
                    break
        except _StopRequested:
            self.save()
            stopped = "interrupted"
            self.echo(f"interrupted at epoch {self.epoch + 1}, batch {self.batch}: saved {ckpt}; "
                      f"continue with --resume")
        finally:
            errstate.__exit__(None, None, None)
            if can_trap:
                signal.signal(signal.SIGINT, previous)
        self._log({"event": "end", "stopped": stopped, "step": self.step, "epoch": self.epoch})
        return TrainResult(self.history, stopped, self.out_dir, self.best_val)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _epoch_line(r: dict, epochs: int) -> str:
    return (f"epoch {r['epoch']}/{epochs}  train {r['train_loss']:.2f} (recon {r['train_recon']:.2f}, kl {r['train_kl']:.2f})"
            f"  val {r['val_loss']:.2f} (recon {r['val_recon']:.2f}, kl {r['val_kl']:.2f})"
            f"  {r['seconds']:.1f}s, {r['images_per_second']:,.0f} img/s")


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
    return result if out_dir is not None else dataclasses.replace(result, out_dir=None)
