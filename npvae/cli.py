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
from pathlib import Path

import numpy as np

from . import backend

MODEL_CHOICES = ("vae", "ae", "dae", "poor", "cvae")
DATASET_CHOICES = ("mnist", "fashion-mnist", "demo")


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# ----------------------------------------------------------------------------- building models


def _model_kwargs(args) -> dict:
    kw = {}
    if args.hidden is not None:
        kw["hidden"] = tuple(args.hidden)
    if args.latent_dim is not None:
        kw["latent_dim"] = args.latent_dim
    if args.activation is not None:
        kw["activation"] = args.activation
    if args.model in ("vae", "cvae"):
        kw["likelihood"] = args.likelihood
        kw["beta"] = args.beta
    if args.logvar_bounds is not None:
        if args.model != "vae":
            raise CLIError("--logvar-bounds applies to --model vae")
        kw["logvar_bounds"] = tuple(args.logvar_bounds)
    if args.model == "dae":
        kw["noise"] = args.noise
        kw["noise_level"] = args.noise_level
    if args.model == "cvae":
        kw["learned_prior"] = not args.fixed_prior
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
}
# Flags a resumed run may change: when to stop, where the same data lives, and what is only displayed.
_RESUME_MAY_CHANGE = {"epochs", "patience", "data_dir", "no_pictures", "log_grad_norms", "no_progress", "backend",
                      "out", "resume"}
# Model flags and the model_config key (and value transform) each sets.
_MODEL_FLAGS = {
    "hidden": ("hidden", list), "latent_dim": ("latent_dim", None), "activation": ("activation", None),
    "likelihood": ("likelihood", None), "beta": ("beta", float), "logvar_bounds": ("logvar_bounds", list),
    "noise": ("noise", None), "noise_level": ("noise_level", float), "fixed_prior": ("learned_prior", lambda v: not v),
}


def _train_config(args):
    from .train import TrainConfig

    values = {}
    for flag, (field, convert) in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        values[field] = convert(value) if convert else value
    if values["epochs"] is None:  # set once the data is known (the demo digits get more passes)
        values["epochs"] = 10
    return TrainConfig(**values)


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
    from .checkpoint import load_checkpoint
    from .models import load_model
    from .train import TrainConfig, Trainer, check_run_meta

    if args.backend:
        backend.set_backend(args.backend)
    run, changed = None, {}
    if args.resume:
        out = _resume_dir(args)
        if not (out / "checkpoint.npz").exists():
            raise CLIError(f"--resume: no checkpoint at {out / 'checkpoint.npz'}")
        _, run = load_checkpoint(out / "checkpoint.npz")
        check_run_meta(run, out / "checkpoint.npz")
        settings, changed = _resume_settings(args, run, getattr(args, "explicit", set()))
        try:
            config = TrainConfig(**settings)
            config.validate()
        except (TypeError, ValueError) as exc:
            raise CLIError(f"{out / 'checkpoint.npz'}: its training settings cannot be used: {exc}") from None
        dataset = _load_data(args, seed=config.seed, source=run.get("data_source"))
    else:
        config = _train_config(args)
        config.validate()
        dataset = _load_data(args, seed=args.seed)
    print(f"data: {dataset.description}")
    if args.epochs is None and run is None:  # the demo set is 13x smaller than MNIST: more passes for the same steps
        config.epochs = 50 if dataset.is_demo else 10
    if run is None:
        out = Path(args.out or f"runs/{args.model}-{dataset.name}")
        model = build_model_from_args(args, dataset.train_x.shape[1:], dataset.num_classes)
    else:
        model, _ = load_model(out / "checkpoint.npz")
    print(f"model: {model!r}")
    print(f"backend: {backend.get_backend()}; writing to {out}/")
    if changed:
        print("resuming with " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    trainer = Trainer(model, dataset, config, out, progress=not args.no_progress)
    trainer.resumed_changes = changed
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
    print(f"{split}: negative ELBO {test['loss']:.2f} nats/image (recon {test['recon']:.2f}, kl {test['kl']:.2f})")
    print(f"wrote {out}/checkpoint.npz, best.npz, log.jsonl" + ("" if args.no_pictures else ", reconstructions.png, samples.png"))
    return 0


def _load_model(path):
    """A saved model and its run's metadata, the metadata's types checked (one CheckpointError if not)."""
    from .models import load_model
    from .train import check_run_meta

    model, meta = load_model(path)
    return model, check_run_meta(meta, path, training=False)


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
    return data.load_dataset(name, data_dir=data_dir, seed=seed)


def _dataset_for(args, meta):
    source = meta.get("data_source") or {"kind": "builtin", "name": meta.get("dataset")}
    return _load_data(args, meta.get("train_config", {}).get("seed", 0), source)


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
    images, labels = (dataset.test_x, dataset.test_y) if args.split == "test" else (dataset.val_x, dataset.val_y)
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


def cmd_evaluate(args) -> int:

    from .models import Conditional, GaussianLatent, StandardNormalPrior, load_model

    model, meta = _load_model(args.checkpoint)
    if args.iw_samples is not None:
        if not (isinstance(model, GaussianLatent) and isinstance(model, StandardNormalPrior)):
            raise CLIError(f"--iw-samples estimates log p(x) of an unconditional VAE; {args.checkpoint} holds a "
                           f"{model.kind}" + (" (its bound would need the learned prior p(z|y))"
                                              if isinstance(model, Conditional) else ""))
    dataset, x, labels, note = _split_data(args, model, meta, args.n, args.fresh_binarization)
    rng = np.random.default_rng(args.seed)
    terms = model.evaluate(x, model.check_labels(labels, len(x)), rng=rng)
    result = {"dataset": dataset.name, "split": args.split, "examples": len(x),
              "negative_elbo": terms.total, "recon": terms.recon, "kl": terms.kl}
    what = ("negative conditional ELBO" if isinstance(model, Conditional) else
            "negative ELBO" if isinstance(model, GaussianLatent) else "loss")
    print(f"{dataset.description}")
    if note:
        print(f"binarization: {note}")
        result["binarization"] = note
    print(f"{args.split}: {what} {terms.total:.3f} (recon {terms.recon:.3f}, kl {terms.kl:.3f}) per image, {len(x)} images")
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


def cmd_sample(args) -> int:
    from .models import Conditional, load_model
    from .viz import figures

    model, meta = _load_model(args.checkpoint)
    rng = np.random.default_rng(args.seed)
    if args.label is not None:
        if not isinstance(model, Conditional):
            raise CLIError(f"--label needs a conditional model (cvae); {args.checkpoint} holds a {model.kind}")
        try:
            model.check_labels(np.array([args.label]))
        except ValueError as exc:
            raise CLIError(f"--label {args.label}: {exc}") from None
    path = figures.samples(model, args.out, rng, n=args.n, label=args.label)
    print(f"wrote {path}")
    return 0


def cmd_reconstruct(args) -> int:
    from .models import load_model
    from .viz import figures

    model, meta = _load_model(args.checkpoint)
    dataset = _dataset_for(args, meta)
    tc = meta.get("train_config", {})
    x = _prepare(dataset.test_x[: args.n], model, tc.get("binarize", "none"), tc.get("seed", 0))
    labels = None if dataset.test_y is None else dataset.test_y[: args.n]
    path = figures.reconstructions(model, x, args.out, model.check_labels(labels, len(x)), n=args.n)
    print(f"wrote {path}")
    return 0


PLOTS = ("reconstructions", "samples", "classes", "interpolation", "latent", "manifold", "curves", "kl", "grad-norms")
PLOT_HELP = """what to draw:
  reconstructions  test images above their reconstructions (--n pairs, default 10)
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
"""
_PLOT_DEFAULT_N = {"reconstructions": 10, "samples": 64, "classes": 10, "interpolation": 5, "manifold": 20}


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
    out = Path(args.out or f"{what}.png")
    if what == "curves":
        print(f"wrote {figures.training_curves(_run_log(args.checkpoint), out)}")
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
    else:
        dataset, x, y, _ = _split_data(args, model, meta)
        names = figures.class_names(dataset.name, dataset.num_classes) if dataset.has_labels else None
        if what == "reconstructions":
            path = figures.reconstructions(model, x, out, y, n=n)
        elif what == "interpolation":
            path = figures.interpolation(model, x, out, y, rows=n, steps=args.steps)
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
    from .models import GaussianLatent, load_model
    from .study import gradflow
    from .viz import figures

    model, meta = _load_model(args.checkpoint)
    if not isinstance(model, GaussianLatent):
        raise CLIError(f"grads studies a VAE's gradients; {args.checkpoint} holds a {model.kind}")
    dataset, x, y, _ = _split_data(args, model, meta, args.n)
    labels = model.check_labels(None if y is None else y.astype(np.int64), len(x))
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    eps = rng.standard_normal((len(x), model.config.latent_dim), dtype=model.dtype)
    rows = gradflow.decomposition_rows(gradflow.decompose_gradients(model, x, eps, y=labels))
    print(f"gradient of the negative ELBO (recon + beta KL, beta = {model.kl_weight:g}) on {len(x)} {args.split} "
          "images, split exactly into its reconstruction and KL parts:")
    print(gradflow.decomposition_text(rows))
    print(f"wrote {figures.gradient_decomposition(rows, out / 'decomposition.png', n=len(x))}")

    k = min(args.examples, len(x))
    table = gradflow.compare_estimators(model, x[:k], args.draws, rng, y=None if labels is None else labels[:k],
                                        names=args.estimators)
    kl = figures.posterior_kl_per_dim(model, x, labels)
    dims = sorted(np.argsort(-kl, kind="stable")[: args.dims].tolist())
    table = gradflow.select_dims(table, dims)
    print()
    print(f"latent dimensions shown: {dims} (the {len(dims)} with the largest mean KL on these images)")
    print(gradflow.estimator_text(table))
    first, labels_of = table["estimators"][0], table["labels"]
    for name in table["estimators"][1:]:
        ratio = np.divide(table[f"{name}_var"], table[f"{first}_var"])
        print(f"{labels_of[name]} variance / {labels_of[first]} variance: median {np.median(ratio):.3g}, "
              f"range {ratio.min():.3g} to {ratio.max():.3g}")
    print(f"wrote {figures.estimator_comparison(table, out / 'estimators.png')}")
    return 0


# ----------------------------------------------------------------------------- parser

MAX_PICTURE_IMAGES = 10_000  # images in one picture: a 100 x 100 grid, a few MB of PNG


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



def _add_data_args(p, default_dataset=None):
    p.add_argument("--dataset", choices=DATASET_CHOICES, default=default_dataset,
                   help="mnist, fashion-mnist, or the 5,000 demo digits shipped with npvae "
                        "(default: full MNIST if on disk or downloadable, else the demo digits)")
    p.add_argument("--data", metavar="PATH",
                   help="your own data instead: a .npy (N, ...) array, an .npz with arrays x and optional y "
                        "(labels) and target, or a folder of PNG/JPEG images of one size; uint8 pixels or "
                        "floats in the model's range")
    p.add_argument("--target", metavar="DIR",
                   help="with --data DIR: a folder of target images matched by file name (input -> target "
                        "training, e.g. noisy -> clean scans)")
    p.add_argument("--data-dir", help="directory holding the IDX files (else $NPVAE_DATA_DIR, the cache, "
                                      "/usr/share/datasets/fashion-mnist, then download)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npvae", description="Variational autoencoders in NumPy, trained on your CPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model and write checkpoints, a log and pictures",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=MODEL_CHOICES, default="vae")
    _add_data_args(p)
    p.add_argument("--epochs", type=_count(1, 1_000_000), default=None, help="default: 10, or 50 on the demo digits")
    p.add_argument("--batch-size", type=_count(1, 1_000_000), default=128)
    p.add_argument("--lr", type=_number, default=1e-3)
    p.add_argument("--optimizer", choices=("sgd", "rmsprop", "adam", "adamw"), default="adam")
    p.add_argument("--weight-decay", type=_number, default=0.0)
    p.add_argument("--momentum", type=_number, default=0.0, help="for sgd and rmsprop")
    p.add_argument("--clip-grad-norm", type=_number, default=None)
    p.add_argument("--latent-dim", type=_count(1, 65_536), default=None, help="default: the model's (vae 20, ae 3)")
    p.add_argument("--hidden", type=_count(1, 65_536), nargs="+", default=None, help="encoder widths, e.g. --hidden 512 256")
    p.add_argument("--activation", default=None, help="relu, leaky_relu, tanh, sigmoid, softplus")
    p.add_argument("--likelihood", choices=("bernoulli", "gaussian", "continuous_bernoulli"), default="bernoulli")
    p.add_argument("--beta", type=_number, default=1.0, help="KL weight")
    p.add_argument("--logvar-bounds", type=_number, nargs=2, metavar=("LO", "HI"), default=None,
                   help="vae: clamp the encoder's logvar into [LO, HI] (its gradient is 0 outside)")
    p.add_argument("--kl-warmup", type=_number, default=0.0, help="epochs over which the KL weight rises to beta")
    p.add_argument("--fixed-prior", action="store_true", help="cvae: use N(0, I) instead of the learned prior p(z|y)")
    p.add_argument("--noise", choices=("salt_pepper", "gaussian"), default="salt_pepper", help="dae corruption")
    p.add_argument("--noise-level", type=_number, default=0.2, help="dae corruption strength")
    p.add_argument("--binarize", choices=("none", "static", "dynamic"), default="none")
    p.add_argument("--patience", type=_count(0, 1_000_000), default=5, help="early stopping patience in epochs (0: off)")
    p.add_argument("--seed", type=_count(0, 2**63 - 1), default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--backend", choices=("auto", "numba", "numpy"), default=None)
    p.add_argument("--out", help="output directory (default: runs/MODEL-DATASET)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-pictures", action="store_true", help="no pictures each epoch")
    p.add_argument("--log-grad-norms", action="store_true", help="log per-layer gradient norms")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="negative ELBO, reconstruction and KL on the test split")
    p.add_argument("checkpoint")
    _add_data_args(p)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--seed", type=_count(0, 2**63 - 1), default=0)
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.add_argument("--iw-samples", type=_count(1, 1_000_000), default=None, metavar="K",
                   help="also estimate -log p(x) by importance weighting with K samples per image (the IWAE "
                        "bound; papers use K = 5000): tighter than the ELBO, and the number papers report")
    p.add_argument("--n", type=_count(1, 10_000_000), default=None, help="evaluate the first N images of the split (default: all)")
    p.add_argument("--fresh-binarization", action="store_true",
                   help="for runs trained on binarized digits: evaluate on a new Bernoulli draw of the images "
                        "from --seed, instead of the run's own fixed draw")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="decode samples from the prior into a PNG grid")
    p.add_argument("checkpoint")
    p.add_argument("--n", type=_count(1, MAX_PICTURE_IMAGES), default=64)
    p.add_argument("--label", type=int, default=None, help="cvae: the class to generate")
    p.add_argument("--seed", type=_count(0, 2**63 - 1), default=0)
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("reconstruct", help="test images above their reconstructions, as a PNG")
    p.add_argument("checkpoint")
    _add_data_args(p)
    p.add_argument("--n", type=_count(1, MAX_PICTURE_IMAGES // 2), default=10)
    p.add_argument("--out", default="reconstructions.png")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("plot", help="draw one picture of a trained model or its run as a PNG",
                       description="Draw one picture of a trained model (or of its run's log) as a PNG.",
                       epilog=PLOT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("what", choices=PLOTS, metavar="WHAT", help="one of: " + ", ".join(PLOTS) + " (see below)")
    p.add_argument("--out", help="PNG to write (default: WHAT.png)")
    _add_data_args(p)
    p.add_argument("--split", choices=("test", "val"), default="test", help="images for the test-set pictures")
    p.add_argument("--n", type=_count(1, MAX_PICTURE_IMAGES), default=None, help="how many (see below)")
    p.add_argument("--steps", type=_count(2, 1_000), default=10, help="interpolation: images per row, endpoints included")
    p.add_argument("--label", type=int, default=None, help="cvae: the class for samples and manifold")
    p.add_argument("--threshold", type=_number, default=0.01, help="kl: nats above which a unit counts as active")
    p.add_argument("--seed", type=_count(0, 2**63 - 1), default=0)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("grads", help="where the gradient comes from, and how noisy its estimators are",
                       description="Split the negative ELBO's gradient on a batch of test images exactly into "
                                   "its reconstruction and KL parts (printed per parameter, decomposition.png), "
                                   "and compare the registered estimators (reparameterization, score function "
                                   "with and without a leave-one-out baseline) of the gradient of E_q[log p(x|z)] w.r.t. q's mean and "
                                   "log-variance (estimators.png).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint")
    _add_data_args(p)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--n", type=_count(1, 10_000), default=64, help="images in the batch for the decomposition")
    p.add_argument("--draws", type=_count(2, 100_000), default=1000, help="draws of z per image for the estimators")
    p.add_argument("--examples", type=_count(1, 1_000), default=2, help="images whose estimator gradients are compared")
    p.add_argument("--dims", type=_count(1, 65_536), default=3, help="latent dimensions shown (those with the largest KL)")
    p.add_argument("--estimators", type=lambda s: [n.strip() for n in s.split(",") if n.strip()], default=None,
                   help="comma-separated estimators to compare, the first the reference of the variance ratios "
                        "(default: all of npvae.study.estimators.ESTIMATORS: reparam,score,baseline)")
    p.add_argument("--seed", type=_count(0, 2**63 - 1), default=0)
    p.add_argument("--out", default="grads", help="directory for decomposition.png and estimators.png")
    p.set_defaults(func=cmd_grads)
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
