"""The argument parser, built from the registries: the presets (:data:`npvae.models.MODELS`) and their
config fields, :class:`npvae.train.TrainConfig`'s fields, the built-in datasets, the figures
(:data:`npvae.viz.figures.FIGURES`) and the estimators. Nothing here lists their names."""

from __future__ import annotations

import argparse

from .common import MAX_PICTURE_IMAGES, conditional_presets, count, int_list, number
from .options import model_knobs, train_knobs
from .recipes import add_recipe_arg, add_recipes_command


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


HelpFormatter = _RawHelp  # the scripts' parsers: every flag's default shown once, their docstrings as written


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and where to look, not the whole usage first:
    ``npvae train: error: argument --model: invalid choice: 'x' (choose from ...)``, then
    ``run 'npvae train --help' for its options``. (Subcommands' parsers are of this class too.)"""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\nrun '{self.prog} --help' for its options\n")


def _command(sub, name: str, summary: str, description: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description, formatter_class=kw.pop("formatter_class", _Help),
                          **kw)


def _table(title: str, rows) -> str:
    """``title:`` and one row per (name, text); a text's own line breaks are indented under it."""
    lines = [f"{title}:"]
    for name, text in rows:
        first, *rest = text.split("\n")
        lines.append(f"  {name:<16} {first}" if len(name) <= 16 else f"  {name}\n{' ' * 19}{first}")
        lines += [" " * 19 + line for line in rest]
    return "\n".join(lines) + "\n"


def add_data_args(p) -> None:
    from .. import data

    downloadable = [f"{name} ({spec.title})" for name, spec in data.DATASETS.items()]
    system = [str(d) for dirs in data.SYSTEM_DATA_DIRS.values() for d in dirs]
    p.add_argument("--dataset", choices=data.builtin_datasets(), default=None,
                   help=f"{', '.join(downloadable)}, or {data.DEMO}: the {data.DEMO_SIZE:,} MNIST digits shipped "
                        f"with npvae (default: full {data.dataset_title(data.DEFAULT_DATASET)} if on disk or "
                        "downloadable, else the demo digits; for a checkpoint, the data it was trained on)")
    p.add_argument("--data", metavar="PATH",
                   help="your own data instead: a .npy (N, ...) array, an .npz with arrays x and optional y "
                        "(labels) and target, or a folder of PNG/JPEG images of one size; uint8 pixels or "
                        "floats in the model's range")
    p.add_argument("--target", metavar="DIR",
                   help="with --data DIR: a folder of target images matched by file name (input -> target "
                        "training, e.g. noisy -> clean scans)")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"folder holding the {' or '.join(s.title for s in data.DATASETS.values())} files (default: "
                        "for a checkpoint, the folder its run read; else $NPVAE_DATA_DIR, the cache"
                        + "".join(f", {d}" for d in system) + ", then download)")


def _add_train(sub) -> None:
    from ..models import DEFAULT_PRESET, MODELS

    p = _command(sub, "train", "train a model and write checkpoints, a log and pictures",
                 "Train a model on a built-in dataset or your own data. Writes checkpoint.npz (resumable), "
                 "best.npz (best validation loss), log.jsonl and, each epoch, reconstructions.png and samples.png "
                 "(classes.png for a conditional model) to --out.",
                 epilog=_table("model presets (--model)", [(name, cls.help) for name, cls in MODELS.items()]),
                 formatter_class=_RawHelp)
    p.add_argument("--config", metavar="FILE.json",
                   help="training settings as JSON: the train_config object a checkpoint stores (npvae info CKPT "
                        "--json prints it), keys as in npvae.TrainConfig; options given here override it")
    p.add_argument("--model", choices=tuple(MODELS), default=DEFAULT_PRESET, metavar="PRESET",
                   help=f"the model: {', '.join(MODELS)} (each described below)")
    add_recipe_arg(p)
    add_data_args(p)
    for knob in (*model_knobs().values(), *train_knobs().values()):
        knob.add_to(p)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="parameter dtype")
    p.add_argument("--backend", choices=("auto", "numba", "numpy"), default=None,
                   help="kernels: numba (compiled) or numpy (default: $NPVAE_BACKEND, else numba when installed)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/MODEL-DATASET, or runs/MODEL-DATASET-2, "
                                                "-3, ... when it holds another run; --resume continues the latest)")
    p.add_argument("--overwrite", action="store_true",
                   help="remove another run's outputs from --out (the default refuses)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .train import cmd_train

    p.set_defaults(func=cmd_train)


def _add_evaluate(sub) -> None:
    from .evaluate import cmd_evaluate

    p = _command(sub, "evaluate", "the model's loss and its terms on the test split (a VAE's negative ELBO, reconstruction and KL in nats)",
                 "Evaluate a checkpoint on its data's test split (or validation split): the negative ELBO and "
                 "its reconstruction and KL parts per image, and with --iw-samples the importance-weighted "
                 "estimate of -log p(x). The run's own data is found again without --data-dir. A paired run "
                 "(trained with --target) is scored against its targets, with the RMSE per pixel of the inputs "
                 "(before) and of the outputs (after cleaning) against them.")
    p.add_argument("checkpoint", help="a checkpoint.npz or best.npz")
    add_data_args(p)
    p.add_argument("--split", choices=("test", "val", "all"), default="test",
                   help="the images to evaluate; all: every example of held-out --data (with --target for a "
                        "paired run), e.g. pages rendered with another seed")
    p.add_argument("--seed", type=count(0, 2**63 - 1), default=0, help="seeds the noise draws")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.add_argument("--iw-samples", type=count(1, 1_000_000), default=None, metavar="K",
                   help="also estimate -log p(x) by importance weighting with K samples per image (the IWAE "
                        "bound; papers use K = 5000): tighter than the ELBO, and the number papers report")
    p.add_argument("--n", type=count(1, 10_000_000), default=None, help="evaluate the first N images of the split (default: all)")
    p.add_argument("--near-zero", type=number, default=None,
                   help="autoencoders: |code activation| at most this counts as near zero in the sparsity "
                        "report (default 0.05)")
    p.add_argument("--fresh-binarization", action="store_true",
                   help="for runs trained on binarized digits: evaluate on a new Bernoulli draw of the images "
                        "from --seed, instead of the run's own fixed draw")
    p.set_defaults(func=cmd_evaluate)


def _add_pictures(sub) -> None:
    from ..viz.figures import FIGURES
    from .pictures import cmd_plot, cmd_reconstruct, cmd_sample

    conditional = conditional_presets()
    p = _command(sub, "sample", "decode samples from the prior into a PNG grid",
                 "Draw codes from the model's prior, decode them and write the images as one grid (a conditional "
                 "model cycles through its classes, or draws --label's).")
    p.add_argument("checkpoint", help="a checkpoint.npz or best.npz")
    p.add_argument("--n", type=count(1, MAX_PICTURE_IMAGES), default=64, help="how many samples")
    p.add_argument("--label", type=int, default=None, help=f"{conditional}: the class to generate (default: every "
                                                          "class in turn)")
    p.add_argument("--seed", type=count(0, 2**63 - 1), default=0, help="seeds the draws")
    p.add_argument("--out", help="picture to write (in a folder: FOLDER/samples.png; default: beside the "
                                 "checkpoint, named after it: RUN/best_samples.png for RUN/best.npz)")
    p.set_defaults(func=cmd_sample)

    p = _command(sub, "reconstruct", "test images above their reconstructions, as a PNG",
                 "Encode the first --n test images of the checkpoint's data and decode their codes: inputs in one "
                 "row, reconstructions in the row below (a denoiser's: corrupted input, output, clean original; "
                 "a paired run's: input, output, target).")
    p.add_argument("checkpoint", help="a checkpoint.npz or best.npz")
    add_data_args(p)
    p.add_argument("--n", type=count(1, MAX_PICTURE_IMAGES // 2), default=10, help="how many test images")
    p.add_argument("--out", help="picture to write (in a folder: FOLDER/reconstructions.png; default: beside the "
                                 "checkpoint, named after it: RUN/best_reconstructions.png for RUN/best.npz)")
    p.set_defaults(func=cmd_reconstruct)

    rows = [(f.name, f.help + (f" (default --n {f.default_n})" if f.default_n else "")) for f in FIGURES.values()]
    p = _command(sub, "plot", "draw one picture of a trained model or its run as a PNG",
                 "Draw one picture of a trained model (or of its run's log) as a PNG.",
                 epilog=_table("what to draw", rows), formatter_class=_RawHelp)
    p.add_argument("checkpoint", help="a checkpoint.npz or best.npz")
    p.add_argument("what", choices=tuple(FIGURES), metavar="WHAT", help="one of: " + ", ".join(FIGURES) + " (see below)")
    p.add_argument("--out", help="picture to write (in a folder: FOLDER/WHAT.png; default: beside the checkpoint, "
                                 "named after it: RUN/best_WHAT.png for RUN/best.npz)")
    add_data_args(p)
    p.add_argument("--split", choices=("test", "val"), default="test", help="images for the test-set pictures")
    p.add_argument("--n", type=count(1, MAX_PICTURE_IMAGES), default=None, help="how many (default: see below)")
    def readers(option: str) -> str:
        return " and ".join(FIGURES.where(lambda f: option in f.options))

    p.add_argument("--steps", type=count(2, 1_000), default=10,
                   help=f"{readers('steps')}: images per row, endpoints included")
    p.add_argument("--label", type=int, default=None, help=f"{conditional}: the class for {readers('label')}")
    p.add_argument("--threshold", type=number, default=0.01,
                   help=f"{readers('threshold')}: nats above which a unit counts as active")
    p.add_argument("--near-zero", type=number, default=None,
                   help=f"{readers('near_zero')}: |activation| at most this counts as near zero (default 0.05)")
    p.add_argument("--seed", type=count(0, 2**63 - 1), default=0, help="seeds the draws")
    p.set_defaults(func=cmd_plot)


def _add_grads(sub) -> None:
    from ..models import MODELS, GaussianLatent
    from ..objectives import BOUNDS
    from ..study.gradflow import default_estimators
    from .grads import cmd_grads

    p = _command(sub, "grads", "where the gradient comes from, and how noisy its estimators are",
                 "Split the negative ELBO's gradient on a batch of test images exactly into its reconstruction "
                 "and KL parts (printed per parameter, decomposition.png), and compare the registered estimators "
                 "(reparameterization, score function with and without a leave-one-out baseline) of the gradient "
                 "of E_q[log p(x|z)] w.r.t. q's mean and log-variance (estimators.png); with --k, the "
                 "signal-to-noise ratio of every parameter's gradient of the ELBO or IWAE bound against k, by "
                 "estimator (sticking the landing and DReG too; snr.png). Every table is printed before anything "
                 "is drawn.")
    gaussian = " or ".join(MODELS.where(lambda cls: issubclass(cls, GaussianLatent)))
    p.add_argument("checkpoint", help=f"a checkpoint.npz or best.npz of a {gaussian}")
    add_data_args(p)
    p.add_argument("--split", choices=("test", "val"), default="test", help="the images to study")
    p.add_argument("--n", type=count(1, 10_000), default=64, help="images in the batch for the decomposition")
    p.add_argument("--draws", type=count(2, 100_000), default=1000, help="draws of z per image for the estimators")
    p.add_argument("--examples", type=count(1, 1_000), default=2, help="images whose estimator gradients are compared")
    p.add_argument("--dims", type=count(1, 65_536), default=3, help="latent dimensions shown (those with the largest KL)")
    p.add_argument("--estimators", type=lambda s: [n.strip() for n in s.split(",") if n.strip()], default=None,
                   help="comma-separated estimators to compare, the first the reference of the variance ratios "
                        f"(default: every registered one that applies: {','.join(default_estimators('recon'))} "
                        f"for E_q[log p(x|z)], {','.join(default_estimators('iwae'))} in the --k study of iwae)")
    p.add_argument("--k", type=int_list, default=None, metavar="K1,K2,...",
                   help="also measure each estimator's gradient of the k-sample --objective for these k: mean, "
                        "variance and signal-to-noise ratio (|mean| / std over --snr-draws draws) of the encoder's "
                        "and decoder's gradients, on --examples images (snr.png)")
    p.add_argument("--objective", choices=tuple(BOUNDS), default="iwae", help="the bound of the --k study")
    p.add_argument("--snr-draws", type=count(2, 100_000), default=200, help="draws per estimator and k in the --k study")
    p.add_argument("--snr-signal", default="own", metavar="own|best|NAME",
                   help="the --k study's signal: own (each estimator's mean), best (per parameter, the mean of the "
                        "unbiased estimator varying least: the same gradient, more precisely) or an estimator's name")
    p.add_argument("--seed", type=count(0, 2**63 - 1), default=0, help="seeds the draws")
    p.add_argument("--out", help="folder for decomposition.png, estimators.png and snr.png (default: beside the "
                                 "checkpoint, named after it: RUN/best_grads/ for RUN/best.npz)")
    p.set_defaults(func=cmd_grads)


def _add_info(sub) -> None:
    from .evaluate import cmd_info

    p = _command(sub, "info", "what a checkpoint holds: model, data, settings, progress",
                 "Describe a checkpoint without running it: the model, the data it was trained on, the training "
                 "settings, the epochs done and the best validation loss.")
    p.add_argument("checkpoint", help="a checkpoint.npz, best.npz or a file written by npvae.save_model")
    p.add_argument("--json", action="store_true",
                   help="print it as JSON (its train_config is what train --config reads)")
    p.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="npvae", description="Variational autoencoders in NumPy, trained on your "
                                     "CPU. Run 'npvae COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_evaluate(sub)
    _add_pictures(sub)
    _add_grads(sub)
    _add_info(sub)
    add_recipes_command(sub)
    return parser


def explicit_dests(argv) -> set[str]:
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
