"""The ``npvae`` command line: train, evaluate, sample, reconstruct, plot and grads.

Run ``npvae COMMAND --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import typing
from pathlib import Path

import numpy as np

from . import backend, memory
from .rundir import picture_path

MODEL_CHOICES = ("vae", "ae", "dae", "poor", "cvae", "sparse-ae", "contractive-ae", "conv-vae", "conv-dae", "conv-ae",
                 "conv-doc-dae")
TRAIN_DEFAULTS = {"batch_size": 128, "patience": 5, "lr": 1e-3}  # unless the preset has its own (train_defaults)
DATASET_CHOICES = ("mnist", "fashion-mnist", "demo")
OPTIMIZERS = ("sgd", "rmsprop", "adam", "adamw")


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# ----------------------------------------------------------------------------- building models


def _model_kwargs(args) -> dict:
    kw = {}
    conv = args.model.startswith("conv-")
    if args.hidden is not None:
        if conv:
            raise CLIError(f"--hidden sets MLP widths; --model {args.model} has the write-up's convolutional layers")
        kw["hidden"] = tuple(args.hidden)
    if args.latent_dim is not None:
        kw["latent_dim"] = args.latent_dim
    if args.activation is not None:
        kw["activation"] = args.activation
    if args.model in ("vae", "cvae", "conv-vae"):
        kw["likelihood"] = args.likelihood
        kw["beta"] = args.beta
    if args.logvar_bounds is not None:
        if args.model not in ("vae", "conv-vae"):
            raise CLIError("--logvar-bounds applies to --model vae and conv-vae")
        kw["logvar_bounds"] = tuple(args.logvar_bounds)
    if args.parameterization is not None:
        if args.model != "conv-vae":
            raise CLIError("--parameterization applies to --model conv-vae")
        kw["parameterization"] = args.parameterization
    if args.model in ("dae", "conv-dae"):
        kw["noise"] = args.noise
        kw["noise_level"] = args.noise_level
    if args.model == "cvae":
        kw["learned_prior"] = not args.fixed_prior
    penalty_flags = {"sparse-ae": ("sparsity_penalty", "sparsity_weight", "sparsity_target"),
                     "contractive-ae": ("contraction_weight",)}
    for model, names in penalty_flags.items():
        for name in names:
            value = getattr(args, name, None)
            if value is None:
                continue
            if args.model != model:
                raise CLIError(f"--{name.replace('_', '-')} applies to --model {model}")
            kw[name] = value
    return kw


def build_model_from_args(args, input_shape: tuple[int, ...], num_classes: int):
    from .models import MODELS, Conditional

    cls = MODELS[args.model]
    kw = _model_kwargs(args)
    if issubclass(cls, Conditional):
        if num_classes < 1:
            raise CLIError(f"--model {args.model} learns p(x | y) and needs class labels; this data has none "
                           "(an .npz with an array 'y', or a built-in dataset)")
        kw["num_classes"] = num_classes
    return cls(input_shape=tuple(input_shape), dtype=np.dtype(args.dtype), seed=args.seed, **kw)


# ----------------------------------------------------------------------------- commands


# How each train flag maps onto the TrainConfig a checkpoint stores: (config field, flag value -> field value).
_TRAIN_FLAGS = {
    "epochs": ("epochs", None), "batch_size": ("batch_size", None), "lr": ("lr", None),
    "optimizer": ("optimizer", None), "weight_decay": ("weight_decay", None), "momentum": ("momentum", None),
    "clip_grad_norm": ("clip_grad_norm", None), "binarize": ("binarize", None),
    "kl_warmup": ("kl_warmup_epochs", None), "patience": ("patience", lambda v: v or None), "seed": ("seed", None),
    "no_pictures": ("pictures", lambda v: not v), "log_grad_norms": ("log_grad_norms", None),
    "objective": ("objective", None), "k": ("k", None), "estimator": ("estimator", None),
}
# Flags a resumed run may change: when to stop, where the same data lives, and what is only displayed.
_RESUME_MAY_CHANGE = {"epochs", "patience", "data_dir", "no_pictures", "log_grad_norms", "no_progress", "backend",
                      "out", "resume"}
# Model flags and the model_config key (and value transform) each sets.
_MODEL_FLAGS = {
    "hidden": ("hidden", list), "latent_dim": ("latent_dim", None), "activation": ("activation", None),
    "likelihood": ("likelihood", None), "beta": ("beta", float), "logvar_bounds": ("logvar_bounds", list),
    "noise": ("noise", None), "noise_level": ("noise_level", float), "fixed_prior": ("learned_prior", lambda v: not v),
    "sparsity_penalty": ("sparsity_penalty", None), "sparsity_weight": ("sparsity_weight", float),
    "sparsity_target": ("sparsity_target", float), "contraction_weight": ("contraction_weight", float),
    "parameterization": ("parameterization", None),
}


def _train_config(args, extra: dict | None = None):
    from .train import TrainConfig

    values = {}
    for flag, (field, convert) in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        values[field] = convert(value) if convert else value
    if values["epochs"] is None:  # set once the data is known (the demo digits get more passes)
        values["epochs"] = 10
    return TrainConfig(**values, **(extra or {}))


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _resume_settings(args, run: dict, explicit: set) -> tuple[dict, dict]:
    """The saved run's settings, with the explicit flags a resume may change applied.

    Returns
    -------
    config : dict
        The TrainConfig fields to resume with.
    changed : dict of field -> [saved, new]
        What the explicit flags changed (recorded in the log).

    Raises
    ------
    CLIError
        Listing every explicit flag that contradicts the saved run.
    """
    saved = run.get("train_config")
    if not isinstance(saved, dict):
        raise CLIError("the checkpoint has no training settings to resume with")
    config, changed, conflicts = dict(saved), {}, []
    for dest in sorted(explicit):
        value = getattr(args, dest, None)
        if dest in _TRAIN_FLAGS:
            field, convert = _TRAIN_FLAGS[dest]
            new = convert(value) if convert else value
            if config.get(field) == new:
                continue
            if dest in _RESUME_MAY_CHANGE:
                config[field] = new
                changed[field] = [saved.get(field), new]
            else:
                conflicts.append(f"{_flag(dest)} {value} (the run used {saved.get(field)!r})")
        elif dest in _MODEL_FLAGS:
            key, convert = _MODEL_FLAGS[dest]
            model_config = run.get("model_config") or {}
            new = None if value is None else (convert(value) if convert else value)
            if key in model_config and model_config[key] != new:
                conflicts.append(f"{_flag(dest)} {value} (the model has {key} = {model_config[key]!r})")
        elif dest == "model" and value != run.get("model"):
            conflicts.append(f"--model {value} (the run trains a {run.get('model')})")
        elif dest == "dtype" and value != run.get("dtype"):
            conflicts.append(f"--dtype {value} (the model is {run.get('dtype')})")
        elif dest == "dataset":
            source = run.get("data_source") or {"kind": "builtin", "name": run.get("dataset")}
            if not (source.get("kind") == "builtin" and source.get("name") == value):
                conflicts.append(f"--dataset {value} (the run trained on {_describe_source(source)})")
        elif dest in ("data", "target"):
            source = run.get("data_source") or {"kind": "builtin", "name": run.get("dataset")}
            was = source.get("path" if dest == "data" else "target") if source.get("kind") == "path" else None
            if was is not None and Path(str(was)).resolve() == Path(value).resolve():
                continue
            if was is not None and not Path(str(was)).exists():  # the same data, moved
                changed[dest] = [was, value]
            else:
                conflicts.append(f"{_flag(dest)} {value} (the run trained on {_describe_source(source)})")
    if conflicts:
        raise CLIError("--resume continues the run as it was set up; these flags contradict it:\n  "
                       + "\n  ".join(conflicts)
                       + "\nDrop them (a resumed run may change --epochs, --patience, --data-dir, --no-pictures, "
                         "--log-grad-norms), or start a new run with another --out.")
    if "epochs" in changed and config["epochs"] < int(run.get("epoch", 0) or 0):
        raise CLIError(f"--epochs {config['epochs']}: the run has already trained {run.get('epoch')} epochs")
    return config, changed


def _describe_source(source: dict) -> str:
    if source.get("kind") == "path":
        return f"--data {source.get('path')}" + (f" --target {source['target']}" if source.get("target") else "")
    return f"--dataset {source.get('name')}"


def _resume_dir(args) -> Path:
    """The run directory --resume continues: --out, else the default one that holds a checkpoint."""
    if args.out:
        return Path(args.out)
    names = [args.dataset] if args.dataset else ["mnist", "demo"]
    candidates = [Path(f"runs/{args.model}-{name}") for name in names]
    for out in candidates:
        if (out / "checkpoint.npz").exists():
            return out
    raise CLIError("--resume: no checkpoint in " + " or ".join(str(c) for c in candidates)
                   + "; pass --out DIR, the run directory to continue")


def cmd_train(args) -> int:
    from .checkpoint import load_checkpoint, npvae_member
    from .models import load_model
    from .models import MODELS
    from .objectives import Objective
    from .train import BEST, CHECKPOINT, LOG, TrainConfig, Trainer, check_run_meta

    Objective(args.objective, args.k, args.estimator)  # a bad combination fails before any data loads
    if args.k * (args.batch_size or 128) > MAX_SAMPLES_PER_PASS:
        raise CLIError(f"--k {args.k} with --batch-size {args.batch_size or 128} decodes "
                       f"{args.k * (args.batch_size or 128):,} samples per step, more than {MAX_SAMPLES_PER_PASS:,} "
                       "(memory grows with it); lower --k or --batch-size")
    if args.overwrite and args.resume:
        raise CLIError("--overwrite removes another run's outputs to start afresh; --resume continues that run")
    if args.config and args.resume:
        raise CLIError("--config sets up a new run; --resume continues a run with the settings it saved")
    extra = _apply_config(args) if args.config else {}
    if args.backend:
        backend.set_backend(args.backend)
    for key, value in TRAIN_DEFAULTS.items():  # the preset's own defaults (conv-dae: batch 2048, patience 10)
        if getattr(args, key) is None:
            setattr(args, key, MODELS[args.model].train_defaults.get(key, value))
    run, changed = None, {}
    if args.resume:
        out = _resume_dir(args)
        if not (out / "checkpoint.npz").exists():
            raise CLIError(f"--resume: no checkpoint at {out / 'checkpoint.npz'}")
        _, run = load_checkpoint(out / "checkpoint.npz", npvae_member)
        check_run_meta(run, out / "checkpoint.npz")
        settings, changed = _resume_settings(args, run, getattr(args, "explicit", set()))
        try:
            config = TrainConfig(**settings)
            config.validate()
        except (TypeError, ValueError) as exc:
            raise CLIError(f"{out / 'checkpoint.npz'}: its training settings cannot be used: {exc}") from None
        dataset = _load_data(args, seed=config.seed, source=run.get("data_source"))
    else:
        config = _train_config(args, extra)
        config.validate()
        dataset = _load_data(args, seed=args.seed)
    print(f"data: {dataset.description}")
    asked = f"{out / 'checkpoint.npz'}" if run is not None else f"--config {args.config}" if args.config else None
    if asked is not None:  # flags are checked above; these settings came from a file
        memory.check_samples(config.k, config.batch_size, MAX_SAMPLES_PER_PASS, asked)
    if args.epochs is None and run is None:  # the demo set is 13x smaller than MNIST: more passes for the same steps
        config.epochs = 50 if dataset.is_demo else 10
    if run is None:
        out = Path(args.out or f"runs/{args.model}-{dataset.name}")
        model_flags = ["model", *sorted(getattr(args, "explicit", set()) & _MODEL_FLAGS.keys())]
        with memory.asked_by(memory.flags_text({_flag(d): getattr(args, d) for d in model_flags})):
            model = build_model_from_args(args, dataset.train_x.shape[1:], dataset.num_classes)
    else:
        model, _ = load_model(out / "checkpoint.npz")
    batch = max(min(config.batch_size, len(dataset.train_x)), min(config.eval_batch_size, len(dataset.val_x)))
    memory.check_batch(model, batch, f"training {model.kind} on batches of {batch}", "lower --batch-size (or train "
                       "on tiles of the images)", k=config.k, training=True, source=asked or "--batch-size / --k")
    print(f"model: {model!r}")
    if not config.training_objective().is_default:
        print(f"objective: {config.training_objective().describe()}")
    print(f"backend: {backend.get_backend()}; writing to {out}/")
    if changed:
        print("resuming with " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    trainer = Trainer(model, dataset, config, out, progress=not args.no_progress)
    trainer.resumed_changes = changed
    trainer.overwrite = getattr(args, "overwrite", False)
    result = trainer.run(resume=run is not None)
    if result.stopped == "interrupted":
        return 128 + int(result.signal or 2)
    test_target = dataset.test_target
    test = trainer.evaluate(
        _prepare(dataset.test_x, model, config.binarize, config.seed), model.check_labels(dataset.test_y, len(dataset.test_x)),
        np.random.default_rng([config.seed, 3]),
        None if test_target is None else _prepare(test_target, model, config.binarize, config.seed),
    )
    split = "validation (this data has no separate test split)" if dataset.is_demo or dataset.test_x is dataset.val_x else "test"
    print(f"{split}: {model.loss_names.format(test['loss'], test['recon'], test['kl'])} per image")
    written = [name for name in (CHECKPOINT, BEST, LOG) if (out / name).exists()]
    print(f"wrote {out}/" + ", ".join(written + [p.name for p in trainer.pictures_written]))
    return 0


def _load_model(path):
    """A saved model and its run's metadata, the metadata's types checked (one CheckpointError if not)."""
    from .models import load_model
    from .train import check_run_meta

    with memory.asked_by(f"checkpoint {path}"):
        model, meta = load_model(path)
    return model, check_run_meta(meta, path, training=False)


# TrainConfig field -> the train option that sets it (fields without one are read from --config only)
_CONFIG_OPTIONS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "optimizer": "optimizer",
                   "weight_decay": "weight_decay", "momentum": "momentum", "clip_grad_norm": "clip_grad_norm",
                   "binarize": "binarize", "kl_warmup_epochs": "kl_warmup", "patience": "patience", "seed": "seed",
                   "pictures": "no_pictures", "log_grad_norms": "log_grad_norms", "objective": "objective", "k": "k",
                   "estimator": "estimator"}
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _fits(value, hint) -> bool:
    """Whether a JSON value has the type of a TrainConfig field (true is no number; 1 is a float)."""
    for t in typing.get_args(hint) or (hint,):
        if t is type(None):
            ok = value is None
        elif t is bool:
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float) if t is float else t) and not isinstance(value, bool)
        if ok:
            return True
    return False


def read_train_settings(path) -> dict:
    """The training settings in a JSON file: an object of :class:`npvae.TrainConfig` fields (a checkpoint's
    ``train_config``), or an object holding one under ``"train_config"`` (``npvae info --json``'s).
    Unknown names and wrong types are one-line errors."""
    from .train import TrainConfig

    from .checkpoint import parse_json, read_text

    settings = parse_json(read_text(path, CLIError, "--config"), CLIError, f"--config {path}")
    if isinstance(settings, dict) and isinstance(settings.get("train_config"), dict):
        settings = settings["train_config"]
    if not isinstance(settings, dict):
        raise CLIError(f"--config {path}: expected a JSON object of training settings, got {type(settings).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    unknown = [k for k in settings if k not in hints]
    if unknown:
        raise CLIError(f"--config {path}: unknown setting{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                       f"the settings are {', '.join(hints)}")
    for key, value in settings.items():
        if not _fits(value, hints[key]):
            words = " or ".join(_TYPE_WORDS[t] for t in typing.get_args(hints[key]) or (hints[key],))
            raise CLIError(f"--config {path}: {key} must be {words}, got {json.dumps(value)}")
    if settings.get("optimizer", "adam") not in OPTIMIZERS:
        raise CLIError(f"--config {path}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {settings['optimizer']!r}")
    return settings


def _apply_config(args) -> dict:
    """Set the train options ``--config`` holds, except those given on the command line; returns the
    settings that have no option."""
    settings = read_train_settings(args.config)
    given = args.explicit
    extra = {}
    for key, value in settings.items():
        dest = _CONFIG_OPTIONS.get(key)
        if dest is None:
            extra[key] = value
        elif dest not in given:
            setattr(args, dest, (not value) if key == "pictures" else (value or 0) if key == "patience" else value)
    return extra


def _prepare(images, model, binarize, seed):
    from .train import prepare_split

    return prepare_split(images, model, binarize, seed + 2)


def _load_data(args, seed: int, source: dict | None = None):
    """The dataset of ``--data`` (a user's file or folder, with ``--target``), else a built-in one; a run's
    remembered ``source`` when neither is given."""
    from . import data

    path, target = getattr(args, "data", None), getattr(args, "target", None)
    if path is None and not args.dataset and isinstance(source, dict) and source.get("kind") == "path":
        try:
            return data.load_path(source.get("path"), source.get("target"), seed=seed)
        except data.DataFileError as exc:
            raise CLIError(f"{exc} (where the run's data was; pass --data PATH to point elsewhere)") from None
    if path is not None:
        return data.load_path(path, target, seed=seed)
    if target is not None:
        raise CLIError("--target pairs a folder of targets with --data DIR; pass --data too")
    remembered = source if isinstance(source, dict) and source.get("kind") == "builtin" else {}
    name = args.dataset or remembered.get("name")
    data_dir = args.data_dir or (remembered.get("data_dir") if name == remembered.get("name") else None)
    if data_dir is not None and not args.data_dir and name in data.DATASETS:
        # The run's folder, remembered: when it has moved, say where npvae looked rather than download.
        if data.find_dataset_dir(name, data_dir) is None:
            raise CLIError(f"the run's {data.DATASETS[name].title} files are no longer in {data_dir} (nor in "
                           f"$NPVAE_DATA_DIR or {data.cache_dir()}); pass --data-dir DIR to point to where they are now")
    return data.load_dataset(name, data_dir=data_dir, seed=seed)


def _dataset_for(args, meta):
    source = meta.get("data_source") or {"kind": "builtin", "name": meta.get("dataset")}
    return _load_data(args, meta.get("train_config", {}).get("seed", 0), source)


def _split_arrays(dataset, split: str):
    """The images, labels and paired targets of ``split``: test, val, or all (every example of a
    held-out ``--data``: its training and validation parts)."""
    if split != "all":
        return tuple(getattr(dataset, f"{split}_{a}") for a in ("x", "y", "target"))
    joined = [(getattr(dataset, f"train_{a}"), getattr(dataset, f"val_{a}")) for a in ("x", "y", "target")]
    return tuple(None if t is None else np.concatenate([t, v]) for t, v in joined)


def _check_held_out(args, meta) -> None:
    """``--split all`` scores every example of ``--data``, so that data must be new to the run."""
    if args.split != "all":
        return
    if getattr(args, "data", None) is None:
        raise CLIError("--split all evaluates every example of held-out data: pass --data PATH (and --target DIR "
                       "for a paired run); the run's own data holds the images it trained on")
    source = meta.get("data_source") or {}
    if source.get("kind") == "path" and source.get("path") and \
            Path(args.data).expanduser().resolve() == Path(source["path"]).resolve():
        raise CLIError(f"--split all evaluates every example of --data, but {args.data} is the data the run trained "
                       "on; pass held-out data, or --split test for its validation part")


def _split_target(dataset, split: str, model, meta, n: int | None = None):
    """The paired targets of ``split`` (first ``n``), prepared as the run's final test report prepared
    them; None when the run reconstructed its inputs (no ``--target``)."""
    target = _split_arrays(dataset, split)[2]
    if target is None:
        return None
    tc = meta.get("train_config", {})
    return _prepare(target if n is None else target[:n], model, tc.get("binarize", "none"), tc.get("seed", 0))


def _split_data(args, model, meta, n: int | None = None, fresh_binarization: bool = False):
    """The images of ``args.split`` (first ``n``), prepared as the run prepared its data.

    Returns
    -------
    dataset, x (N, D) floats, y (N,) labels, note : str or None
        ``note`` says how binary runs' images were binarized.
    """
    from . import data

    dataset = _dataset_for(args, meta)
    tc = meta.get("train_config", {})
    images, labels, _ = _split_arrays(dataset, args.split)
    if n is not None:
        images, labels = images[:n], None if labels is None else labels[:n]
    binarize = tc.get("binarize", "none")
    note = None
    if binarize != "none" and fresh_binarization:
        x = data.binarize_static(data.to_model_range(images, (0.0, 1.0), model.dtype), np.random.default_rng([args.seed, 17]))
        note = (f"the run trained on binarized digits ({binarize}); these images are a fresh Bernoulli draw "
                f"(pixel intensity = probability of 1) from --seed {args.seed}")
    elif binarize != "none":
        x = _prepare(images, model, binarize, tc.get("seed", 0))
        note = (f"the run trained on binarized digits ({binarize}); these images are one Bernoulli draw "
                "(pixel intensity = probability of 1) seeded by the run's seed, the draw its final test "
                "report used (--fresh-binarization draws another)")
    else:
        x = _prepare(images, model, binarize, tc.get("seed", 0))
    return dataset, x, labels, note


def _trained_objective(meta):
    """The :class:`npvae.objectives.Objective` a checkpoint's run trained with (None when unknown)."""
    from .objectives import Objective

    tc = meta.get("train_config")
    if not isinstance(tc, dict):
        return None
    try:
        return Objective(tc.get("objective", "elbo"), tc.get("k", 1), tc.get("estimator", "reparam"))
    except ValueError:
        return None


def cmd_evaluate(args) -> int:
    from .models import Autoencoder, Conditional, GaussianLatent, StandardNormalPrior

    model, meta = _load_model(args.checkpoint)
    _near_zero(args)
    if args.iw_samples is not None:
        if not (isinstance(model, GaussianLatent) and isinstance(model, StandardNormalPrior)):
            raise CLIError(f"--iw-samples estimates log p(x) of an unconditional VAE; {args.checkpoint} holds a "
                           f"{model.kind}" + (" (its bound would need the learned prior p(z|y))"
                                              if isinstance(model, Conditional) else ""))
    _check_held_out(args, meta)
    dataset, x, labels, note = _split_data(args, model, meta, args.n, args.fresh_binarization)
    target = _split_target(dataset, args.split, model, meta, args.n)
    if target is not None and args.iw_samples is not None:
        raise CLIError(f"--iw-samples estimates log p(x) of the inputs; {args.checkpoint}'s run was paired "
                       "(input -> target), so its ELBO is of the targets: evaluate without --iw-samples")
    memory.check_batch(model, min(len(x), 1000), f"evaluating {len(x):,} images", "lower --n",
                       source=f"evaluate {args.checkpoint}")
    rng = np.random.default_rng(args.seed)
    labels = model.check_labels(labels, len(x))
    terms = model.evaluate(x, labels, rng=rng, target=target)
    names = model.loss_names
    result = {"dataset": dataset.name, "split": args.split, "examples": len(x), "loss_name": names.total,
              "unit": names.unit, "loss": terms.total, "recon": terms.recon, "kl": terms.kl}
    print(f"{dataset.description}")
    trained = _trained_objective(meta)
    if trained is not None and not trained.is_default:
        print(f"trained on: {trained.describe()} (the ELBO below is the usual one-sample estimate)")
        result["objective"] = {"name": trained.name, "k": trained.k, "estimator": trained.estimator}
    if note:
        print(f"binarization: {note}")
        result["binarization"] = note
    against = " against the targets" if target is not None else ""
    print(f"{args.split}: {names.format(terms.total, terms.recon, terms.kl, digits=3)} per image{against}, "
          f"{len(x)} images")
    result["paired"] = target is not None
    if target is not None:
        from .study.cleaning import cleaning_rmse

        rmse = cleaning_rmse(model, x, target, labels)
        print(f"{args.split}: RMSE per pixel against the targets ([0, 1] units): input {rmse['before']:.4f} "
              f"(before), output {rmse['after']:.4f} (after cleaning)")
        result.update({"rmse_input_target": rmse["before"], "rmse_output_target": rmse["after"]})
    if isinstance(model, Autoencoder):
        result.update(_code_report(model, x, args))
    if args.iw_samples is not None:
        from .study.likelihood import iwae_log_likelihood

        log_px = iwae_log_likelihood(model, x, args.iw_samples, np.random.default_rng([args.seed, 1]))
        nll, se = float(-log_px.mean()), float(log_px.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
        print(f"{args.split}: IWAE estimate of -log p(x), k = {args.iw_samples}: {nll:.3f} per image "
              f"(standard error {se:.3f} over the images), {terms.total - nll:.3f} below the negative ELBO")
        result.update({"iw_samples": args.iw_samples, "iwae_nll": nll, "iwae_nll_se": se})
    if args.json:
        print(json.dumps(result))
    return 0


def _near_zero(args) -> float:
    from .study.regularity import NEAR_ZERO

    value = NEAR_ZERO if args.near_zero is None else args.near_zero
    if not value >= 0:
        raise CLIError(f"--near-zero must be >= 0, got {value}")
    return value


def _sparsity_text(stats: dict) -> str:
    return (f"mean activation {stats['mean_activation']:.4f}, mean |h| {stats['mean_abs']:.4f}, "
            f"{100 * stats['near_zero']:.1f}% near zero (|h| <= {stats['threshold']:g})")


def _code_report(model, x, args) -> dict:
    """Print and return how sparse and how contractive an autoencoder's code is on ``x``."""
    from .study import regularity

    stats = regularity.code_sparsity(model.codes(x), _near_zero(args))
    print(f"{args.split}: code sparsity over {model.config.latent_dim} units: {_sparsity_text(stats)}")
    result = {"code_mean_activation": stats["mean_activation"], "code_mean_abs": stats["mean_abs"],
              "code_near_zero": stats["near_zero"], "near_zero_threshold": stats["threshold"]}
    try:
        norms = regularity.contraction(model, x)
    except ValueError:  # an encoder of other layers than Dense (the conv presets): no exact Jacobian norm here
        return result
    print(f"{args.split}: contraction: mean ||d code / d x||_F {norms.mean():.4f} over {len(x)} images "
          f"(median {np.median(norms):.4f})")
    result["mean_jacobian_frobenius"] = float(norms.mean())
    return result


def cmd_sample(args) -> int:
    from .models import Conditional
    from .viz import figures

    out = picture_path(args.out, "samples.png")
    model, meta = _load_model(args.checkpoint)
    rng = np.random.default_rng(args.seed)
    if args.label is not None:
        if not isinstance(model, Conditional):
            raise CLIError(f"--label needs a conditional model (cvae); {args.checkpoint} holds a {model.kind}")
        try:
            model.check_labels(np.array([args.label]))
        except ValueError as exc:
            raise CLIError(f"--label {args.label}: {exc}") from None
    memory.check_batch(model, args.n, f"decoding {args.n} samples", "lower --n", images=args.n,
                       source=f"--n {args.n} with {args.checkpoint}")
    path = figures.samples(model, out, rng, n=args.n, label=args.label)
    print(f"wrote {path}")
    return 0


def cmd_reconstruct(args) -> int:
    from .viz import figures

    model, meta = _load_model(args.checkpoint)
    memory.check_batch(model, args.n, f"reconstructing {args.n} images", "lower --n", images=3 * args.n,
                       source=f"--n {args.n} with {args.checkpoint}")
    dataset = _dataset_for(args, meta)
    tc = meta.get("train_config", {})
    x = _prepare(dataset.test_x[: args.n], model, tc.get("binarize", "none"), tc.get("seed", 0))
    labels = None if dataset.test_y is None else dataset.test_y[: args.n]
    target = _split_target(dataset, "test", model, meta, args.n)
    path = figures.reconstructions(model, x, picture_path(args.out, "reconstructions.png"),
                                   model.check_labels(labels, len(x)), n=args.n, target=target)
    print(f"wrote {path}")
    return 0


def _source_text(meta: dict) -> str:
    """Where a run's data came from, in words."""
    if meta.get("dataset_description"):
        return meta["dataset_description"]
    from .data import DATASETS

    source = meta.get("data_source") or {}
    if source.get("kind") == "builtin":
        name = source.get("name")
        title = DATASETS[name].title if name in DATASETS else "the demo digits" if name == "demo" else str(name)
        return title + (f" from {source['data_dir']}" if source.get("data_dir") else "")
    if source.get("kind") == "path":
        return source.get("path", "?") + (f" (targets {source['target']})" if source.get("target") else "")
    return meta.get("dataset") or "not recorded"


def checkpoint_info(path) -> dict:
    """What ``npvae info`` reports, as a JSON-able dict."""
    model, meta = _load_model(path)
    history = [r for r in meta.get("history", []) if isinstance(r, dict) and "val_loss" in r]
    best, best_epoch = meta.get("best_val_loss"), None
    if history:
        top = min(history, key=lambda r: r["val_loss"])
        best, best_epoch = top["val_loss"], top.get("epoch")
    elif meta.get("val_loss") is not None:  # best.npz: saved at its best epoch
        best, best_epoch = meta["val_loss"], meta.get("epoch")
    tc = meta.get("train_config") or None
    return {"path": str(path), "model": meta.get("model"), "description": repr(model),
            "parameters": model.num_parameters, "data": _source_text(meta), "data_source": meta.get("data_source"),
            "train_config": tc, "epoch": meta.get("epoch"), "epochs": None if tc is None else tc.get("epochs"),
            "step": meta.get("step"), "resumable": "rng_state" in meta, "best_val_loss": best, "best_epoch": best_epoch}


def cmd_info(args) -> int:
    from .checkpoint import finite_json, printable

    info = checkpoint_info(args.checkpoint)
    if args.json:
        print(json.dumps(finite_json(info), indent=2, allow_nan=False))
        return 0

    def say(line: str) -> None:  # the file's strings are shown, never obeyed as terminal codes
        print(printable(line))

    kind = ("a training checkpoint (resumable with --resume)" if info["resumable"] else
            "the best parameters of a run" if info["best_epoch"] is not None else "a saved model")
    say(f"{info['path']}: {kind}")
    say(f"model: {info['description']}")
    say(f"data: {info['data']}")
    tc = info["train_config"]
    say("training: " + ("not recorded (saved with npvae.save_model)" if tc is None else
                        " ".join(f"{k}={v}" for k, v in tc.items())))
    if info["epoch"] is not None:
        of = f" of {info['epochs']}" if info["epochs"] is not None else ""
        step = f" (step {info['step']})" if info["step"] is not None else ""
        say(f"epochs: {info['epoch']}{of} done{step}" if info["resumable"] else
            f"epoch: saved after epoch {info['epoch']}")
    if info["best_val_loss"] is not None:
        at = f" (epoch {info['best_epoch']})" if info["best_epoch"] is not None else ""
        say(f"best validation loss: {info['best_val_loss']:.4f}{at}")
    return 0


PLOTS = ("reconstructions", "samples", "classes", "interpolation", "latent", "manifold", "curves", "kl", "grad-norms",
         "filters", "code-histogram")
PLOT_HELP = """what to draw:
  reconstructions  test images above their reconstructions (--n pairs, default 10); a denoising
                   model's: corrupted input, output and clean original, row under row
  samples          decoded draws from the prior (--n, default 64; --label for a cvae)
  classes          cvae: one row of samples per class, drawn from each class's prior (--n per row, default 10)
  interpolation    decoded straight lines between two test images' posterior means
                   (--n rows, default 5; --steps per row, default 10)
  latent           posterior means of the test images coloured by label (PCA when Z > 2)
  manifold         a 2-D model's decoder over a grid of Gaussian quantiles (--n per side,
                   default 20; --label for a cvae); an error for Z != 2
  curves           loss curves from the run's log.jsonl beside the checkpoint
  kl               mean KL per latent unit over the test images and the number of active units
                   (KL > --threshold nats): the posterior-collapse diagnostic
  grad-norms       per-layer gradient norms over training, from log.jsonl (train with --log-grad-norms)
  filters          the first layer's weights as 28x28 tiles, one per unit (--n units, default 100); an
                   error for models whose first layer is not dense over 784 inputs
  code-histogram   histogram of every code activation over the test images, the share with
                   |h| <= --near-zero shaded (sparse autoencoders: most should sit near 0)
"""
_PLOT_DEFAULT_N = {"reconstructions": 10, "samples": 64, "classes": 10, "interpolation": 5, "manifold": 20,
                   "filters": 100}


def _run_log(checkpoint) -> Path:
    log = Path(checkpoint).parent / "log.jsonl"
    if not log.is_file():
        raise CLIError(f"no training log at {log}: curves and grad-norms read the log.jsonl that training "
                       "writes beside its checkpoints")
    return log


def cmd_plot(args) -> int:
    from .models import Conditional, load_model
    from .viz import figures

    what = args.what
    out = picture_path(args.out or f"{what}.png", f"{what}.png")
    if what == "curves":
        names = load_model(args.checkpoint)[0].loss_names
        print(f"wrote {figures.training_curves(_run_log(args.checkpoint), out, names)}")
        return 0
    if what == "grad-norms":
        print(f"wrote {figures.grad_norms(_run_log(args.checkpoint), out)}")
        return 0
    model, meta = _load_model(args.checkpoint)
    conditional = isinstance(model, Conditional)
    if args.label is not None and what not in ("samples", "manifold"):
        raise CLIError(f"--label applies to samples and manifold, not {what}")
    if args.label is not None and not conditional:
        raise CLIError(f"--label needs a conditional model (cvae); {args.checkpoint} holds a {model.kind}")
    n = args.n if args.n is not None else _PLOT_DEFAULT_N.get(what)
    images = {"manifold": (n or 0) ** 2, "interpolation": (n or 0) * args.steps, "reconstructions": 2 * (n or 0),
              "classes": (n or 0) * getattr(model, "num_classes", 1)}.get(what, n or 0)
    if images > MAX_PICTURE_IMAGES:
        raise CLIError(f"{what} with --n {n} would draw {images:,} images; one picture holds at most "
                       f"{MAX_PICTURE_IMAGES:,}")
    memory.check_batch(model, max(images, 1), f"drawing {what} ({images:,} images)", "lower --n", images=images,
                       source=f"plot {what} with {args.checkpoint}")
    rng = np.random.default_rng(args.seed)
    if what == "samples":
        path = figures.samples(model, out, rng, n=n, label=args.label)
    elif what == "classes":
        if not conditional:
            raise CLIError(f"classes needs a conditional model (cvae); {args.checkpoint} holds a {model.kind}")
        names = figures.class_names(meta.get("dataset"), model.num_classes)
        path = figures.class_grid(model, out, rng, n_per_class=n, names=names)
    elif what == "manifold":
        path = figures.manifold(model, out, n=n, label=args.label)
    elif what == "filters":
        if n < 1:
            raise CLIError(f"--n must be at least 1, got {n}")
        path = figures.filters(model, out, n=n)
    else:
        dataset, x, y, _ = _split_data(args, model, meta)
        names = figures.class_names(dataset.name, dataset.num_classes) if dataset.has_labels else None
        if what == "reconstructions":  # a paired run's pictures show its targets in a third row
            path = figures.reconstructions(model, x, out, y, n=n, rng=rng,
                                           target=_split_target(dataset, args.split, model, meta, n))
        elif what == "interpolation":
            path = figures.interpolation(model, x, out, y, rows=n, steps=args.steps)
        elif what == "code-histogram":
            path, stats = figures.code_histogram(model, x, out, y, threshold=_near_zero(args))
            print(f"code activations of {len(x)} {args.split} images: {_sparsity_text(stats)}")
        elif what == "latent":
            path, explained = figures.latent_scatter(model, x, y, out, class_names=names)
            if explained is not None:
                print(f"PCA of the {model.config.latent_dim}-D codes: the two components keep "
                      f"{100 * explained[0]:.1f}% and {100 * explained[1]:.1f}% of their variance")
        else:  # kl
            path, kl = figures.kl_per_dim(model, x, out, y, threshold=args.threshold)
            active = int((kl > args.threshold).sum())
            print(f"mean KL per latent unit over {len(x)} {args.split} images (nats): "
                  + " ".join(f"{v:.3f}" for v in kl))
            print(f"active units: {active} of {len(kl)} (mean KL > {args.threshold:g} nats); total KL {kl.sum():.3f}")
    print(f"wrote {path}")
    return 0


def cmd_grads(args) -> int:
    from .models import GaussianLatent, StandardNormalPrior
    from .objectives import check_k_sample_model
    from .study import gradflow
    from .study.estimators import ESTIMATORS, estimators
    from .viz import figures
    from .viz.plots import MatplotlibMissing

    model, meta = _load_model(args.checkpoint)
    if not isinstance(model, GaussianLatent):
        raise CLIError(f"grads studies a VAE's gradients; {args.checkpoint} holds a {model.kind}")
    names = None if args.estimators is None else [e.name for e in estimators(args.estimators)]
    if args.k is not None:  # checked before any work
        if not isinstance(model, StandardNormalPrior):
            raise CLIError(f"--k studies the ELBO and IWAE bounds under the prior N(0, I); {args.checkpoint} holds "
                           f"a {model.kind} with a prior of its own")
        check_k_sample_model(model, "the --k study")
        snr_names = None if names is None else [n for n in names if args.objective in ESTIMATORS[n].objectives
                                                and not ESTIMATORS[n].pools_draws]
        measured = snr_names if snr_names is not None else [e.name for e in ESTIMATORS.values()
                                                            if args.objective in e.objectives and not e.pools_draws]
        unbiased = [n for n in measured if ESTIMATORS[n].is_unbiased(args.objective)]
        if measured and args.snr_signal == "best" and not unbiased:
            raise CLIError(f"--snr-signal best: none of {','.join(measured)} is unbiased for the {args.objective} gradient")
        if measured and args.snr_signal not in ("own", "best", *unbiased):
            raise CLIError(f"--snr-signal {args.snr_signal}: expected own, best or one of the measured estimators "
                           f"unbiased for the {args.objective} gradient ({','.join(unbiased)})")
        if snr_names == []:
            raise CLIError(f"none of --estimators {','.join(names)} estimates the {args.objective} gradient")
    if args.k is not None and args.examples * max(args.k) > MAX_SAMPLES_PER_PASS:
        raise CLIError(f"--k up to {max(args.k)} on --examples {args.examples} images decodes "
                       f"{args.examples * max(args.k):,} samples per draw, more than {MAX_SAMPLES_PER_PASS:,}; "
                       "lower --k or --examples")
    if args.k is not None:
        memory.check_batch(model, args.examples, f"the --k study on {args.examples} images", "lower --k or --examples",
                           k=max(args.k), training=True, source=f"--k {max(args.k)} --examples {args.examples}")
    dataset, x, y, _ = _split_data(args, model, meta, args.n)
    labels = model.check_labels(None if y is None else y.astype(np.int64), len(x))
    examples = min(args.examples, len(x))
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)

    eps = rng.standard_normal((len(x), model.config.latent_dim), dtype=model.dtype)
    rows = gradflow.decomposition_rows(gradflow.decompose_gradients(model, x, eps, y=labels))
    print(f"gradient of the negative ELBO (recon + beta KL, beta = {model.kl_weight:g}) on {len(x)} {args.split} "
          "images, split exactly into its reconstruction and KL parts:")
    print(gradflow.decomposition_text(rows))

    table = snr_rows = None
    recon_names = None if names is None else [n for n in names if "recon" in ESTIMATORS[n].objectives]
    if recon_names is None or recon_names:
        skipped = [] if names is None else [n for n in names if n not in recon_names]
        table = gradflow.compare_estimators(model, x[:examples], args.draws, rng,
                                            y=None if labels is None else labels[:examples], names=recon_names)
        kl = figures.posterior_kl_per_dim(model, x, labels)
        dims = sorted(np.argsort(-kl, kind="stable")[: args.dims].tolist())
        table = gradflow.select_dims(table, dims)
        print()
        print(f"latent dimensions shown: {dims} (the {len(dims)} with the largest mean KL on these images)")
        if skipped:
            print(f"({', '.join(skipped)}: for the ELBO and IWAE bounds, not {gradflow.OBJECTIVE}"
                  + ("; in the k study below)" if args.k else "; pass --k to study them)"))
        print(gradflow.estimator_text(table))
        first, labels_of = table["estimators"][0], table["labels"]
        for name in table["estimators"][1:]:
            ratio = np.divide(table[f"{name}_var"], table[f"{first}_var"])
            print(f"{labels_of[name]} variance / {labels_of[first]} variance: median {np.median(ratio):.3g}, "
                  f"range {ratio.min():.3g} to {ratio.max():.3g}")
    if args.k is not None:
        snr_rows = gradflow.estimator_snr(model, x[:examples], args.k, args.snr_draws, rng, names=snr_names,
                                          objective=args.objective,
                                          signal=None if args.snr_signal == "own" else args.snr_signal)
        print()
        dropped = [] if names is None else [n for n in names if n not in snr_names]
        if dropped:
            print(f"({', '.join(dropped)}: not in the k study, which takes one estimate per draw of the "
                  f"{args.objective} gradient)")
        print(f"signal-to-noise of the {args.objective} bound's gradient on {examples} {args.split} images, "
              f"k = {', '.join(map(str, args.k))}:")
        print(gradflow.snr_text(snr_rows))
    try:  # the tables above are the result; the pictures, with axes, need matplotlib
        print(f"wrote {figures.gradient_decomposition(rows, out / 'decomposition.png', n=len(x))}")
        if table is not None:
            print(f"wrote {figures.estimator_comparison(table, out / 'estimators.png')}")
        if snr_rows is not None:
            print(f"wrote {figures.snr(snr_rows, out / 'snr.png', args.objective)}")
    except MatplotlibMissing as exc:
        print(f"pictures skipped: {exc}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- parser

MAX_PICTURE_IMAGES = 10_000  # images in one picture: a 100 x 100 grid, a few MB of PNG
MAX_SAMPLES_PER_PASS = 2**18  # k samples x images decoded at once (x 784 floats: ~0.8 GB in float32)


def _count(lo: int, hi: int):
    """An argparse type: a whole number in [lo, hi], so that a typo cannot ask for a negative count
    (which slicing would quietly turn into "all but the last few") or exhaust memory."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo:,} to {hi:,}, got {value:,}")
        return value

    return count


def _number(text: str) -> float:
    """An argparse type: a finite float (NaN and infinities are refused with the flag's name)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value



class _Help(argparse.HelpFormatter):
    """Each option's default shown once: added as "(default: X)" unless its help already says it
    (or there is nothing to show: None, a switch's False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


class _RawHelp(_Help, argparse.RawDescriptionHelpFormatter):
    """:class:`_Help`, with the description and epilog printed as written (tables)."""


def _command(sub, name: str, summary: str, description: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description, formatter_class=kw.pop("formatter_class", _Help),
                          **kw)


def _add_data_args(p, default_dataset=None):
    p.add_argument("--dataset", choices=DATASET_CHOICES, default=default_dataset,
                   help="mnist, fashion-mnist, or the 5,000 demo digits shipped with npvae "
                        "(default: full MNIST if on disk or downloadable, else the demo digits; "
                        "for a checkpoint, the data it was trained on)")
    p.add_argument("--data", metavar="PATH",
                   help="your own data instead: a .npy (N, ...) array, an .npz with arrays x and optional y "
                        "(labels) and target, or a folder of PNG/JPEG images of one size; uint8 pixels or "
                        "floats in the model's range")
    p.add_argument("--target", metavar="DIR",
                   help="with --data DIR: a folder of target images matched by file name (input -> target "
                        "training, e.g. noisy -> clean scans)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder holding the MNIST or Fashion-MNIST files (default: for a checkpoint, the folder "
                        "its run read; else $NPVAE_DATA_DIR, the cache, /usr/share/datasets/fashion-mnist, then "
                        "download)")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,5,50, got {text!r}") from None
    if not values or min(values) < 1 or max(values) > 10_000:
        raise argparse.ArgumentTypeError(f"expected integers from 1 to 10,000 like 1,5,50, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="npvae", description="Variational autoencoders in NumPy, trained on your "
                                     "CPU. Run 'npvae COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "train", "train a model and write checkpoints, a log and pictures",
                 "Train a model on a built-in dataset or your own data. Writes checkpoint.npz (resumable), "
                 "best.npz (best validation loss), log.jsonl and, each epoch, reconstructions.png and samples.png "
                 "(classes.png for a cvae) to --out.")
    p.add_argument("--config", metavar="FILE.json",
                   help="training settings as JSON: the train_config object a checkpoint stores (npvae info CKPT "
                        "--json prints it), keys as in npvae.TrainConfig; options given here override it")
    p.add_argument("--model", choices=MODEL_CHOICES, default="vae",
                   help="vae (Gaussian VAE), ae (autoencoder), dae (denoising autoencoder), poor (poor man's VAE), "
                        "cvae (conditional VAE)")
    _add_data_args(p)
    p.add_argument("--epochs", type=_count(1, 1_000_000), default=None, help="passes over the training set (default: 10, or 50 "
                                                             "on the demo digits)")
    p.add_argument("--batch-size", type=_count(1, 1_000_000), default=None,
                   help="examples per step (default: 128; conv-dae 2048, conv-doc-dae 16, the write-ups')")
    p.add_argument("--lr", type=_number, default=None, help="learning rate (default: 1e-3)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="optimizer")
    p.add_argument("--weight-decay", type=_number, default=0.0,
                   help="L2 penalty (adam, sgd, rmsprop) or decoupled weight decay (adamw)")
    p.add_argument("--momentum", type=_number, default=0.0, help="momentum, for sgd and rmsprop")
    p.add_argument("--clip-grad-norm", type=_number, default=None, metavar="MAX",
                   help="clip the global gradient norm to MAX (default: no clipping)")
    p.add_argument("--latent-dim", type=_count(1, 65_536), default=None, help="latent size Z (default: the model's: vae 20, ae 3, conv-vae 2; the conv autoencoders' "
                        "code is their encoder's output)")
    p.add_argument("--hidden", type=_count(1, 65_536), nargs="+", default=None,
                   help="encoder widths, e.g. --hidden 512 256; the decoder mirrors them (default: the model's)")
    p.add_argument("--activation", default=None,
                   help="hidden activation: relu, leaky_relu, tanh, sigmoid, softplus (default: the model's)")
    p.add_argument("--likelihood", choices=("bernoulli", "gaussian", "continuous_bernoulli"), default="bernoulli",
                   help="vae, cvae: the decoder's p(x|z)")
    p.add_argument("--beta", type=_number, default=1.0, help="vae, cvae: KL weight (1 gives the ELBO)")
    p.add_argument("--logvar-bounds", type=_number, nargs=2, metavar=("LO", "HI"), default=None,
                   help="vae: clamp the encoder's logvar into [LO, HI] (its gradient is 0 outside)")
    p.add_argument("--kl-warmup", type=_number, default=0.0, metavar="EPOCHS",
                   help="epochs over which the KL weight rises from 0 to beta")
    p.add_argument("--parameterization", choices=("logvar", "log_sigma"), default=None,
                   help="conv-vae: the second head is log sigma^2 (logvar, default) or log sigma, read the same "
                        "way by the sampler and the KL")
    p.add_argument("--fixed-prior", action="store_true", help="cvae: use N(0, I) instead of the learned prior p(z|y)")
    p.add_argument("--noise", choices=("salt_pepper", "gaussian"), default="salt_pepper", help="dae and conv-dae: corruption")
    p.add_argument("--noise-level", type=_number, default=0.2,
                   help="dae and conv-dae: fraction of pixels hit (salt_pepper) or noise std (gaussian)")
    p.add_argument("--sparsity-penalty", choices=("kl", "l1"), default=None,
                   help="sparse-ae: kl (each code unit's mean activation over the batch pulled to --sparsity-target; "
                        "sigmoid codes) or l1 (sum of |code| per image, Keras' activity_regularizer=l1) "
                        "(default: kl)")
    p.add_argument("--sparsity-weight", type=_number, default=None,
                   help="sparse-ae: the penalty's weight (default: 3 for kl, as beta in Ng's notes; 0.1 for l1)")
    p.add_argument("--sparsity-target", type=_number, default=None,
                   help="sparse-ae, kl: the target mean activation rho of each code unit (default: 0.05)")
    p.add_argument("--contraction-weight", type=_number, default=None,
                   help="contractive-ae: lambda, the weight of ||d code / d x||_F^2 per image (default: 0.1)")
    p.add_argument("--binarize", choices=("none", "static", "dynamic"), default="none",
                   help="binarize the images: one fixed Bernoulli draw (static) or a fresh one per batch (dynamic)")
    p.add_argument("--patience", type=_count(0, 1_000_000), default=None,
                   help="early stopping patience in epochs (0: off; default: 5, conv-dae 10, the write-up's)")
    p.add_argument("--seed", type=_count(0, 2**63 - 1), default=0, help="seeds the initialisation, the split, the batches and the noise")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="parameter dtype")
    p.add_argument("--backend", choices=("auto", "numba", "numpy"), default=None,
                   help="kernels: numba (compiled) or numpy (default: $NPVAE_BACKEND, else numba when installed)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/MODEL-DATASET)")
    p.add_argument("--overwrite", action="store_true",
                   help="remove another run's outputs from --out (the default refuses)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-pictures", action="store_true", help="no pictures each epoch")
    p.add_argument("--log-grad-norms", action="store_true", help="log per-layer gradient norms to log.jsonl")
    p.add_argument("--objective", choices=("elbo", "iwae"), default="elbo",
                   help="vae: the training bound, the ELBO or the importance-weighted bound of --k samples")
    p.add_argument("--k", type=_count(1, 10_000), default=1, help="samples of z per image for --objective")
    p.add_argument("--estimator", choices=("reparam", "stl", "dreg"), default="reparam",
                   help="the encoder's gradient estimator: reparam (plain), stl (sticking the landing: no score "
                        "term), dreg (doubly reparameterized, iwae only). Not the default elbo/1/reparam: a Monte-"
                        "Carlo KL, beta = 1, no KL warm-up")
    p.set_defaults(func=cmd_train)

    p = _command(sub, "evaluate", "the model's loss and its terms on the test split (a VAE's negative ELBO, reconstruction and KL in nats)",
                 "Evaluate a checkpoint on its data's test split (or validation split): the negative ELBO and "
                 "its reconstruction and KL parts per image, and with --iw-samples the importance-weighted "
                 "estimate of -log p(x). The run's own data is found again without --data-dir. A paired run "
                 "(trained with --target) is scored against its targets, with the RMSE per pixel of the inputs "
                 "(before) and of the outputs (after cleaning) against them.")
    p.add_argument("checkpoint", help="a checkpoint.npz or best.npz")
    _add_data_args(p)
    p.add_argument("--split", choices=("test", "val", "all"), default="test",
                   help="the images to evaluate; all: every example of held-out --data (with --target for a "
                        "paired run), e.g. pages rendered with another seed")
    p.add_argument("--seed", type=_count(0, 2**63 - 1), default=0, help="seeds the noise draws")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.add_argument("--iw-samples", type=_count(1, 1_000_000), default=None, metavar="K",
                   help="also estimate -log p(x) by importance weighting with K samples per image (the IWAE "
                        "bound; papers use K = 5000): tighter than the ELBO, and the number papers report")
    p.add_argument("--n", type=_count(1, 10_000_000), default=None, help="evaluate the first N images of the split (default: all)")
    p.add_argument("--near-zero", type=_number, default=None,
                   help="autoencoders: |code activation| at most this counts as near zero in the sparsity "
                        "report (default 0.05)")
    p.add_argument("--fresh-binarization", action="store_true",
                   help="for runs trained on binarized digits: evaluate on a new Bernoulli draw of the images "
                        "from --seed, instead of the run's own fixed draw")
    p.set_defaults(func=cmd_evaluate)

    p = _command(sub, "sample", "decode samples from the prior into a PNG grid",
                 "Draw codes from the model's prior, decode them and write the images as one grid (a cvae "
                 "cycles through its classes, or draws --label's).")
    p.add_argument("checkpoint", help="a checkpoint.npz or best.npz")
    p.add_argument("--n", type=_count(1, MAX_PICTURE_IMAGES), default=64, help="how many samples")
    p.add_argument("--label", type=int, default=None, help="cvae: the class to generate (default: every class in turn)")
    p.add_argument("--seed", type=_count(0, 2**63 - 1), default=0, help="seeds the draws")
    p.add_argument("--out", default="samples.png", help="picture to write")
    p.set_defaults(func=cmd_sample)

    p = _command(sub, "reconstruct", "test images above their reconstructions, as a PNG",
                 "Encode the first --n test images of the checkpoint's data and decode their codes: inputs in one "
                 "row, reconstructions in the row below (a denoiser's: corrupted input, output, clean original; "
                 "a paired run's: input, output, target).")
    p.add_argument("checkpoint", help="a checkpoint.npz or best.npz")
    _add_data_args(p)
    p.add_argument("--n", type=_count(1, MAX_PICTURE_IMAGES // 2), default=10, help="how many test images")
    p.add_argument("--out", default="reconstructions.png", help="picture to write")
    p.set_defaults(func=cmd_reconstruct)

    p = _command(sub, "plot", "draw one picture of a trained model or its run as a PNG",
                 "Draw one picture of a trained model (or of its run's log) as a PNG.",
                 epilog=PLOT_HELP, formatter_class=_RawHelp)
    p.add_argument("checkpoint", help="a checkpoint.npz or best.npz")
    p.add_argument("what", choices=PLOTS, metavar="WHAT", help="one of: " + ", ".join(PLOTS) + " (see below)")
    p.add_argument("--out", help="picture to write (default: WHAT.png)")
    _add_data_args(p)
    p.add_argument("--split", choices=("test", "val"), default="test", help="images for the test-set pictures")
    p.add_argument("--n", type=_count(1, MAX_PICTURE_IMAGES), default=None, help="how many (default: see below)")
    p.add_argument("--steps", type=_count(2, 1_000), default=10, help="interpolation: images per row, endpoints included")
    p.add_argument("--label", type=int, default=None, help="cvae: the class for samples and manifold")
    p.add_argument("--threshold", type=_number, default=0.01, help="kl: nats above which a unit counts as active")
    p.add_argument("--near-zero", type=_number, default=None,
                   help="code-histogram: |activation| at most this counts as near zero (default 0.05)")
    p.add_argument("--seed", type=_count(0, 2**63 - 1), default=0, help="seeds the draws")
    p.set_defaults(func=cmd_plot)

    p = _command(sub, "grads", "where the gradient comes from, and how noisy its estimators are",
                 "Split the negative ELBO's gradient on a batch of test images exactly into its reconstruction "
                 "and KL parts (printed per parameter, decomposition.png), and compare the registered estimators "
                 "(reparameterization, score function with and without a leave-one-out baseline) of the gradient "
                 "of E_q[log p(x|z)] w.r.t. q's mean and log-variance (estimators.png); with --k, the "
                 "signal-to-noise ratio of every parameter's gradient of the ELBO or IWAE bound against k, by "
                 "estimator (sticking the landing and DReG too; snr.png). Every table is printed before anything "
                 "is drawn.")
    p.add_argument("checkpoint", help="a checkpoint.npz or best.npz of a vae or cvae")
    _add_data_args(p)
    p.add_argument("--split", choices=("test", "val"), default="test", help="the images to study")
    p.add_argument("--n", type=_count(1, 10_000), default=64, help="images in the batch for the decomposition")
    p.add_argument("--draws", type=_count(2, 100_000), default=1000, help="draws of z per image for the estimators")
    p.add_argument("--examples", type=_count(1, 1_000), default=2, help="images whose estimator gradients are compared")
    p.add_argument("--dims", type=_count(1, 65_536), default=3, help="latent dimensions shown (those with the largest KL)")
    p.add_argument("--estimators", type=lambda s: [n.strip() for n in s.split(",") if n.strip()], default=None,
                   help="comma-separated estimators to compare, the first the reference of the variance ratios "
                        "(default: all of npvae.study.estimators.ESTIMATORS that apply: reparam,score,baseline "
                        "for E_q[log p(x|z)], and stl and dreg too in the --k study)")
    p.add_argument("--k", type=_int_list, default=None, metavar="K1,K2,...",
                   help="also measure each estimator's gradient of the k-sample --objective for these k: mean, "
                        "variance and signal-to-noise ratio (|mean| / std over --snr-draws draws) of the encoder's "
                        "and decoder's gradients, on --examples images (snr.png)")
    p.add_argument("--objective", choices=("iwae", "elbo"), default="iwae", help="the bound of the --k study")
    p.add_argument("--snr-draws", type=_count(2, 100_000), default=200, help="draws per estimator and k in the --k study")
    p.add_argument("--snr-signal", default="own", metavar="own|best|NAME",
                   help="the --k study's signal: own (each estimator's mean), best (per parameter, the mean of the "
                        "unbiased estimator varying least: the same gradient, more precisely) or an estimator's name")
    p.add_argument("--seed", type=_count(0, 2**63 - 1), default=0, help="seeds the draws")
    p.add_argument("--out", default="grads", help="folder for decomposition.png, estimators.png and snr.png")
    p.set_defaults(func=cmd_grads)

    p = _command(sub, "info", "what a checkpoint holds: model, data, settings, progress",
                 "Describe a checkpoint without running it: the model, the data it was trained on, the training "
                 "settings, the epochs done and the best validation loss.")
    p.add_argument("checkpoint", help="a checkpoint.npz, best.npz or a file written by npvae.save_model")
    p.add_argument("--json", action="store_true",
                   help="print it as JSON (its train_config is what train --config reads)")
    p.set_defaults(func=cmd_info)
    return parser


def _explicit_dests(argv) -> set[str]:
    """The options given on the command line (not left at their defaults): parse again with every
    default suppressed."""
    parser = build_parser()
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                actions.extend(sub._actions)
    for action in actions:
        if action.dest not in ("command", "func", "help"):
            action.default = argparse.SUPPRESS
    given = parser.parse_args(argv)
    return {dest for dest in vars(given) if dest not in ("command", "func")}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else 2
    args.explicit = _explicit_dests(argv)
    from .checkpoint import CheckpointError
    from .data import DownloadError, IDXFormatError
    from .rundir import RunLocked
    from .train import Terminated, TrainingDiverged, raise_on_sigterm

    restore = None
    if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        restore = signal.signal(signal.SIGTERM, raise_on_sigterm)  # unwind: partial downloads are removed
    try:
        return args.func(args)
    except KeyboardInterrupt:  # outside training (which saves and returns 130 itself)
        print(f"npvae {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"npvae {args.command}: terminated (signal {exc.signum})", file=sys.stderr)
        return 128 + exc.signum
    except (CLIError, CheckpointError, DownloadError, IDXFormatError, TrainingDiverged, OSError,
            RunLocked, ValueError, TypeError, ImportError) as exc:
        if os.environ.get("NPVAE_DEBUG"):  # the full traceback, for bug reports
            raise
        print(f"npvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)


if __name__ == "__main__":
    sys.exit(main())
