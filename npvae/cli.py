"""The ``npvae`` command line: train, evaluate, sample, reconstruct, plot and grads.

Run ``npvae COMMAND --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def cmd_train(args) -> int:
    from .models import load_model
    from .objectives import Objective
    from .train import TrainConfig, Trainer

    Objective(args.objective, args.k, args.estimator)  # a bad combination fails before any data loads
    if args.backend:
        backend.set_backend(args.backend)
    source, seed = None, args.seed
    if args.resume and args.out and (Path(args.out) / "checkpoint.npz").exists():
        from .checkpoint import load_checkpoint

        _, run = load_checkpoint(Path(args.out) / "checkpoint.npz")  # the data and split the run trained on
        source, seed = run.get("data_source"), run.get("train_config", {}).get("seed", args.seed)
    dataset = _load_data(args, seed=seed, source=source)
    print(f"data: {dataset.description}")
    if args.epochs is None:  # the demo set is 13x smaller than MNIST: more passes for the same steps
        args.epochs = 50 if dataset.is_demo else 10
    out = Path(args.out or f"runs/{args.model}-{dataset.name}")
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, momentum=args.momentum, clip_grad_norm=args.clip_grad_norm,
        binarize=args.binarize, kl_warmup_epochs=args.kl_warmup, patience=args.patience or None, seed=args.seed,
        pictures=not args.no_pictures, log_grad_norms=args.log_grad_norms,
        objective=args.objective, k=args.k, estimator=args.estimator,
    )
    if args.resume and (out / "checkpoint.npz").exists():
        model, meta = load_model(out / "checkpoint.npz")
        saved = meta.get("train_config", {})
        if saved.get("seed") != args.seed or saved.get("batch_size") != args.batch_size:
            print("note: resuming with the saved run's seed and batch size", file=sys.stderr)
            config.seed, config.batch_size = saved.get("seed", config.seed), saved.get("batch_size", config.batch_size)
        run_objective = tuple(saved.get(key, default) for key, default in
                              (("objective", "elbo"), ("k", 1), ("estimator", "reparam")))
        if run_objective != (config.objective, config.k, config.estimator):
            print("note: resuming with the saved run's objective, k and estimator", file=sys.stderr)
            config.objective, config.k, config.estimator = run_objective
    else:
        model = build_model_from_args(args, dataset.train_x.shape[1:], dataset.num_classes)
    print(f"model: {model!r}")
    if not config.training_objective().is_default:
        print(f"objective: {config.training_objective().describe()}")
    print(f"backend: {backend.get_backend()}; writing to {out}/")
    trainer = Trainer(model, dataset, config, out, progress=not args.no_progress)
    result = trainer.run(resume=args.resume)
    if result.stopped != "interrupted":
        test_target = dataset.test_target
        test = trainer.evaluate(
            _prepare(dataset.test_x, model, config.binarize, config.seed), model.check_labels(dataset.test_y, len(dataset.test_x)),
            np.random.default_rng([config.seed, 3]),
            None if test_target is None else _prepare(test_target, model, config.binarize, config.seed),
        )
        split = "validation (this data has no separate test split)" if dataset.is_demo or dataset.test_x is dataset.val_x else "test"
        print(f"{split}: negative ELBO {test['loss']:.2f} nats/image (recon {test['recon']:.2f}, kl {test['kl']:.2f})")
        print(f"wrote {out}/checkpoint.npz, best.npz, log.jsonl" + ("" if args.no_pictures else ", reconstructions.png, samples.png"))
    return 130 if result.stopped == "interrupted" else 0


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
        if n < 1:
            raise CLIError(f"--n must be at least 1, got {n}")
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

    from .models import Conditional, GaussianLatent, StandardNormalPrior, load_model

    model, meta = load_model(args.checkpoint)
    if args.iw_samples is not None:
        if args.iw_samples < 1:
            raise CLIError(f"--iw-samples must be at least 1, got {args.iw_samples}")
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
    trained = _trained_objective(meta)
    if trained is not None and not trained.is_default:
        print(f"trained on: {trained.describe()} (the ELBO below is the usual one-sample estimate)")
        result["objective"] = {"name": trained.name, "k": trained.k, "estimator": trained.estimator}
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

    model, meta = load_model(args.checkpoint)
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

    model, meta = load_model(args.checkpoint)
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
    model, meta = load_model(args.checkpoint)
    conditional = isinstance(model, Conditional)
    if args.label is not None and what not in ("samples", "manifold"):
        raise CLIError(f"--label applies to samples and manifold, not {what}")
    if args.label is not None and not conditional:
        raise CLIError(f"--label needs a conditional model (cvae); {args.checkpoint} holds a {model.kind}")
    n = args.n if args.n is not None else _PLOT_DEFAULT_N.get(what)
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
    from .models import GaussianLatent, StandardNormalPrior, load_model
    from .objectives import check_k_sample_model
    from .study import gradflow
    from .study.estimators import ESTIMATORS, estimators
    from .viz import figures

    model, meta = load_model(args.checkpoint)
    if not isinstance(model, GaussianLatent):
        raise CLIError(f"grads studies a VAE's gradients; {args.checkpoint} holds a {model.kind}")
    if args.draws < 2 or args.examples < 1 or args.snr_draws < 2:
        raise CLIError(f"expected --draws >= 2, --snr-draws >= 2 and --examples >= 1, got {args.draws}, "
                       f"{args.snr_draws} and {args.examples}")
    names = None if args.estimators is None else [e.name for e in estimators(args.estimators)]
    if args.k is not None:  # checked before any work
        if not isinstance(model, StandardNormalPrior):
            raise CLIError(f"--k studies the ELBO and IWAE bounds under the prior N(0, I); {args.checkpoint} holds "
                           f"a {model.kind} with a prior of its own")
        check_k_sample_model(model, "the --k study")
        snr_names = None if names is None else [n for n in names if args.objective in ESTIMATORS[n].objectives
                                                and not ESTIMATORS[n].pools_draws]
        if snr_names == []:
            raise CLIError(f"none of --estimators {','.join(names)} estimates the {args.objective} gradient")
    dataset, x, y, _ = _split_data(args, model, meta, args.n)
    labels = model.check_labels(None if y is None else y.astype(np.int64), len(x))
    examples = min(args.examples, len(x))
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    eps = rng.standard_normal((len(x), model.config.latent_dim), dtype=model.dtype)
    rows = gradflow.decomposition_rows(gradflow.decompose_gradients(model, x, eps, y=labels))
    print(f"gradient of the negative ELBO (recon + beta KL, beta = {model.kl_weight:g}) on {len(x)} {args.split} "
          "images, split exactly into its reconstruction and KL parts:")
    print(gradflow.decomposition_text(rows))
    print(f"wrote {figures.gradient_decomposition(rows, out / 'decomposition.png', n=len(x))}")

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
        print(f"wrote {figures.estimator_comparison(table, out / 'estimators.png')}")
    if args.k is not None:
        rows = gradflow.estimator_snr(model, x[:examples], args.k, args.snr_draws, rng, names=snr_names,
                                      objective=args.objective)
        print()
        dropped = [] if names is None else [n for n in names if n not in snr_names]
        if dropped:
            print(f"({', '.join(dropped)}: not in the k study, which takes one estimate per draw of the "
                  f"{args.objective} gradient)")
        print(f"signal-to-noise of the {args.objective} bound's gradient on {examples} {args.split} images, "
              f"k = {', '.join(map(str, args.k))}:")
        print(gradflow.snr_text(rows))
        print(f"wrote {figures.snr(rows, out / 'snr.png', args.objective)}")
    return 0


# ----------------------------------------------------------------------------- parser


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


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,5,50, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 like 1,5,50, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npvae", description="Variational autoencoders in NumPy, trained on your CPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model and write checkpoints, a log and pictures",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=MODEL_CHOICES, default="vae")
    _add_data_args(p)
    p.add_argument("--epochs", type=int, default=None, help="default: 10, or 50 on the demo digits")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("sgd", "rmsprop", "adam", "adamw"), default="adam")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.0, help="for sgd and rmsprop")
    p.add_argument("--clip-grad-norm", type=float, default=None)
    p.add_argument("--latent-dim", type=int, default=None, help="default: the model's (vae 20, ae 3)")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="encoder widths, e.g. --hidden 512 256")
    p.add_argument("--activation", default=None, help="relu, leaky_relu, tanh, sigmoid, softplus")
    p.add_argument("--likelihood", choices=("bernoulli", "gaussian", "continuous_bernoulli"), default="bernoulli")
    p.add_argument("--beta", type=float, default=1.0, help="KL weight")
    p.add_argument("--logvar-bounds", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="vae: clamp the encoder's logvar into [LO, HI] (its gradient is 0 outside)")
    p.add_argument("--kl-warmup", type=float, default=0.0, help="epochs over which the KL weight rises to beta")
    p.add_argument("--fixed-prior", action="store_true", help="cvae: use N(0, I) instead of the learned prior p(z|y)")
    p.add_argument("--noise", choices=("salt_pepper", "gaussian"), default="salt_pepper", help="dae corruption")
    p.add_argument("--noise-level", type=float, default=0.2, help="dae corruption strength")
    p.add_argument("--binarize", choices=("none", "static", "dynamic"), default="none")
    p.add_argument("--patience", type=int, default=5, help="early stopping patience in epochs (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--backend", choices=("auto", "numba", "numpy"), default=None)
    p.add_argument("--out", help="output directory (default: runs/MODEL-DATASET)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-pictures", action="store_true", help="no pictures each epoch")
    p.add_argument("--log-grad-norms", action="store_true", help="log per-layer gradient norms")
    p.add_argument("--objective", choices=("elbo", "iwae"), default="elbo",
                   help="vae: the training bound, the ELBO or the importance-weighted bound of --k samples")
    p.add_argument("--k", type=int, default=1, help="samples of z per image for --objective")
    p.add_argument("--estimator", choices=("reparam", "stl", "dreg"), default="reparam",
                   help="the encoder's gradient estimator: reparam (plain), stl (sticking the landing: no score "
                        "term), dreg (doubly reparameterized, iwae only). Not the default elbo/1/reparam: a Monte-"
                        "Carlo KL, beta = 1, no KL warm-up")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="negative ELBO, reconstruction and KL on the test split")
    p.add_argument("checkpoint")
    _add_data_args(p)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.add_argument("--iw-samples", type=int, default=None, metavar="K",
                   help="also estimate -log p(x) by importance weighting with K samples per image (the IWAE "
                        "bound; papers use K = 5000): tighter than the ELBO, and the number papers report")
    p.add_argument("--n", type=int, default=None, help="evaluate the first N images of the split (default: all)")
    p.add_argument("--fresh-binarization", action="store_true",
                   help="for runs trained on binarized digits: evaluate on a new Bernoulli draw of the images "
                        "from --seed, instead of the run's own fixed draw")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="decode samples from the prior into a PNG grid")
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--label", type=int, default=None, help="cvae: the class to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("reconstruct", help="test images above their reconstructions, as a PNG")
    p.add_argument("checkpoint")
    _add_data_args(p)
    p.add_argument("--n", type=int, default=10)
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
    p.add_argument("--n", type=int, default=None, help="how many (see below)")
    p.add_argument("--steps", type=int, default=10, help="interpolation: images per row, endpoints included")
    p.add_argument("--label", type=int, default=None, help="cvae: the class for samples and manifold")
    p.add_argument("--threshold", type=float, default=0.01, help="kl: nats above which a unit counts as active")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("grads", help="where the gradient comes from, and how noisy its estimators are",
                       description="Split the negative ELBO's gradient on a batch of test images exactly into "
                                   "its reconstruction and KL parts (printed per parameter, decomposition.png), "
                                   "and compare the registered estimators (reparameterization, score function "
                                   "with and without a leave-one-out baseline) of the gradient of "
                                   "E_q[log p(x|z)] w.r.t. q's mean and log-variance (estimators.png); with --k, the "
                                   "signal-to-noise ratio of every parameter's gradient of the ELBO or IWAE bound "
                                   "against k, by estimator (sticking the landing and DReG too; snr.png).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint")
    _add_data_args(p)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--n", type=int, default=64, help="images in the batch for the decomposition")
    p.add_argument("--draws", type=int, default=1000, help="draws of z per image for the estimators")
    p.add_argument("--examples", type=int, default=2, help="images whose estimator gradients are compared")
    p.add_argument("--dims", type=int, default=3, help="latent dimensions shown (those with the largest KL)")
    p.add_argument("--estimators", type=lambda s: [n.strip() for n in s.split(",") if n.strip()], default=None,
                   help="comma-separated estimators to compare, the first the reference of the variance ratios "
                        "(default: all of npvae.study.estimators.ESTIMATORS that apply: reparam,score,baseline "
                        "for E_q[log p(x|z)], and stl and dreg too in the --k study)")
    p.add_argument("--k", type=_int_list, default=None, metavar="K1,K2,...",
                   help="also measure each estimator's gradient of the k-sample --objective for these k: mean, "
                        "variance and signal-to-noise ratio (|mean| / std over --snr-draws draws) of the encoder's "
                        "and decoder's gradients, on --examples images (snr.png)")
    p.add_argument("--objective", choices=("iwae", "elbo"), default="iwae", help="the bound of the --k study")
    p.add_argument("--snr-draws", type=int, default=200, help="draws per estimator and k in the --k study")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grads", help="directory for decomposition.png, estimators.png and snr.png")
    p.set_defaults(func=cmd_grads)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DownloadError, IDXFormatError
    from .train import TrainingDiverged

    try:
        return args.func(args)
    except KeyboardInterrupt:  # outside training (which saves and returns 130 itself)
        print(f"npvae {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, CheckpointError, DownloadError, IDXFormatError, TrainingDiverged, FileExistsError,
            FileNotFoundError, ValueError, TypeError, ImportError) as exc:
        if os.environ.get("NPVAE_DEBUG"):  # the full traceback, for bug reports
            raise
        print(f"npvae {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
