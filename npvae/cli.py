"""The ``npvae`` command line: train, evaluate, sample and reconstruct.

Run ``npvae COMMAND --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import json
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
    if args.model == "dae":
        kw["noise"] = args.noise
        kw["noise_level"] = args.noise_level
    if args.model == "cvae":
        kw["learned_prior"] = not args.fixed_prior
    return kw


def build_model_from_args(args, input_dim: int, num_classes: int):
    from .models import MODELS

    cls = MODELS[args.model]
    kw = _model_kwargs(args)
    if args.model == "cvae":
        kw["num_classes"] = num_classes
    return cls(input_dim=input_dim, dtype=np.dtype(args.dtype), seed=args.seed, **kw)


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from . import data
    from .train import TrainConfig, Trainer, load_model

    if args.backend:
        backend.set_backend(args.backend)
    dataset = data.load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed)
    print(f"data: {dataset.description}")
    if args.epochs is None:  # the demo set is 13x smaller than MNIST: more passes for the same steps
        args.epochs = 50 if dataset.is_demo else 10
    out = Path(args.out or f"runs/{args.model}-{dataset.name}")
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, momentum=args.momentum, clip_grad_norm=args.clip_grad_norm,
        binarize=args.binarize, kl_warmup_epochs=args.kl_warmup, patience=args.patience or None, seed=args.seed,
        pictures=not args.no_pictures, log_grad_norms=args.log_grad_norms,
    )
    if args.resume and (out / "checkpoint.npz").exists():
        model, meta = load_model(out / "checkpoint.npz")
        saved = meta.get("train_config", {})
        if saved.get("seed") != args.seed or saved.get("batch_size") != args.batch_size:
            print("note: resuming with the saved run's seed and batch size", file=sys.stderr)
            config.seed, config.batch_size = saved.get("seed", config.seed), saved.get("batch_size", config.batch_size)
    else:
        model = build_model_from_args(args, dataset.train_x.shape[1], dataset.num_classes)
    print(f"model: {model!r}")
    print(f"backend: {backend.get_backend()}; writing to {out}/")
    trainer = Trainer(model, dataset, config, out, progress=not args.no_progress)
    result = trainer.run(resume=args.resume)
    if result.stopped != "interrupted":
        test = trainer.evaluate(
            _prepare(dataset.test_x, model, config.binarize, config.seed), dataset.test_y, np.random.default_rng([config.seed, 3])
        )
        split = "validation (demo data has no separate test split)" if dataset.is_demo else "test"
        print(f"{split}: negative ELBO {test['loss']:.2f} nats/image (recon {test['recon']:.2f}, kl {test['kl']:.2f})")
        print(f"wrote {out}/checkpoint.npz, best.npz, log.jsonl" + ("" if args.no_pictures else ", reconstructions.png, samples.png"))
    return 130 if result.stopped == "interrupted" else 0


def _prepare(images, model, binarize, seed):
    from .train import prepare_split

    return prepare_split(images, model, binarize, seed + 2)


def _dataset_for(args, meta):
    from . import data

    name = args.dataset or meta.get("dataset")
    return data.load_dataset(name, data_dir=args.data_dir, seed=meta.get("train_config", {}).get("seed", 0))


def cmd_evaluate(args) -> int:
    from .train import load_model

    model, meta = load_model(args.checkpoint)
    dataset = _dataset_for(args, meta)
    tc = meta.get("train_config", {})
    images, labels = (dataset.test_x, dataset.test_y) if args.split == "test" else (dataset.val_x, dataset.val_y)
    x = _prepare(images, model, tc.get("binarize", "none"), tc.get("seed", 0))
    rng = np.random.default_rng(args.seed)
    conditional = getattr(model, "conditional", False)
    terms = model.evaluate(x, labels, rng) if conditional else model.evaluate(x, rng)
    result = {"dataset": dataset.name, "split": args.split, "examples": len(x),
              "negative_elbo": terms.total, "recon": terms.recon, "kl": terms.kl}
    what = "negative conditional ELBO" if conditional else "negative ELBO" if model.kind == "vae" else "loss"
    print(f"{dataset.description}")
    print(f"{args.split}: {what} {terms.total:.3f} (recon {terms.recon:.3f}, kl {terms.kl:.3f}) per image, {len(x)} images")
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_sample(args) -> int:
    from . import figures
    from .train import load_model

    model, meta = load_model(args.checkpoint)
    rng = np.random.default_rng(args.seed)
    if args.label is not None:
        if not getattr(model, "conditional", False):
            raise CLIError(f"--label needs a conditional model (cvae); {args.checkpoint} holds a {model.kind}")
        try:
            model.check_labels(np.array([args.label]))
        except ValueError as exc:
            raise CLIError(f"--label {args.label}: {exc}") from None
    path = figures.samples(model, args.out, rng, n=args.n, label=args.label)
    print(f"wrote {path}")
    return 0


def cmd_reconstruct(args) -> int:
    from . import figures
    from .train import load_model

    model, meta = load_model(args.checkpoint)
    dataset = _dataset_for(args, meta)
    tc = meta.get("train_config", {})
    x = _prepare(dataset.test_x[: args.n], model, tc.get("binarize", "none"), tc.get("seed", 0))
    path = figures.reconstructions(model, x, args.out, dataset.test_y[: args.n], n=args.n)
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- parser


def _add_data_args(p, default_dataset=None):
    p.add_argument("--dataset", choices=DATASET_CHOICES, default=default_dataset,
                   help="mnist, fashion-mnist, or the 5,000 demo digits shipped with npvae "
                        "(default: full MNIST if on disk or downloadable, else the demo digits)")
    p.add_argument("--data-dir", help="directory holding the IDX files (else $NPVAE_DATA_DIR, the cache, "
                                      "/usr/share/datasets/fashion-mnist, then download)")


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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="negative ELBO, reconstruction and KL on the test split")
    p.add_argument("checkpoint")
    _add_data_args(p)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DownloadError, IDXFormatError
    from .train import TrainingDiverged

    try:
        return args.func(args)
    except (CLIError, CheckpointError, DownloadError, IDXFormatError, TrainingDiverged, FileExistsError,
            FileNotFoundError, ValueError, TypeError, ImportError) as exc:
        print(f"npvae {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
