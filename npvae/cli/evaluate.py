"""``npvae evaluate`` (a checkpoint's loss on held-out data) and ``npvae info`` (what a checkpoint holds)."""

from __future__ import annotations

import json

import numpy as np

from .. import memory
from .common import CLIError, load_model, near_zero
from .inputs import check_held_out, split_data, split_target


def _trained_objective(meta):
    """The :class:`npvae.objectives.Objective` a checkpoint's run trained with (None when unknown)."""
    from ..objectives import Objective

    tc = meta.get("train_config")
    if not isinstance(tc, dict):
        return None
    try:
        return Objective.from_config(tc)
    except ValueError:
        return None


def cmd_evaluate(args) -> int:
    from ..models import Autoencoder, Conditional, GaussianLatent, StandardNormalPrior

    model, meta = load_model(args.checkpoint)
    near_zero(args)
    if args.iw_samples is not None:
        if not (isinstance(model, GaussianLatent) and isinstance(model, StandardNormalPrior)):
            raise CLIError(f"--iw-samples estimates log p(x) of an unconditional VAE; {args.checkpoint} holds a "
                           f"{model.kind}" + (" (its bound would need the learned prior p(z|y))"
                                              if isinstance(model, Conditional) else ""))
    check_held_out(args, meta)
    dataset, x, labels, note = split_data(args, model, meta, args.n, args.fresh_binarization)
    target = split_target(dataset, args.split, model, meta, args.n)
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
              "unit": names.unit, "loss": terms.total, "loss_se": terms.se, "recon": terms.recon, "reg": terms.reg,
              "kl": terms.reg}  # kl: the regulariser under its key from before the rename, for scripts reading it
    print(f"{dataset.description}")
    trained = _trained_objective(meta)
    if trained is not None and not trained.is_default:
        print(f"trained on: {trained.describe()} (the ELBO below is the usual one-sample estimate)")
        result["objective"] = {"name": trained.name, "k": trained.k, "estimator": trained.estimator}
    if note:
        print(f"binarization: {note}")
        result["binarization"] = note
    against = " against the targets" if target is not None else ""
    print(f"{args.split}: {names.format(terms.total, terms.recon, terms.reg, se=terms.se)} per image{against} "
          f"(± its standard error over the {len(x):,} images)")
    result["paired"] = target is not None
    if target is not None:
        from ..study.cleaning import cleaning_rmse

        rmse = cleaning_rmse(model, x, target, labels)
        print(f"{args.split}: RMSE per pixel against the targets ([0, 1] units): input {rmse['before']:.4f} "
              f"(before), output {rmse['after']:.4f} (after cleaning)")
        result.update({"rmse_input_target": rmse["before"], "rmse_output_target": rmse["after"]})
    if isinstance(model, Autoencoder):
        result.update(_code_report(model, x, args))
    if args.iw_samples is not None:
        from ..study.likelihood import iwae_log_likelihood

        log_px = iwae_log_likelihood(model, x, args.iw_samples, np.random.default_rng([args.seed, 1]))
        nll, se = float(-log_px.mean()), float(log_px.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
        print(f"{args.split}: IWAE estimate of -log p(x), k = {args.iw_samples}: {nll:.2f} ± {se:.2f} per image "
              f"(± its standard error over the images), {terms.total - nll:.2f} below the negative ELBO")
        result.update({"iw_samples": args.iw_samples, "iwae_nll": nll, "iwae_nll_se": se})
    if args.json:
        print(json.dumps(result))
    return 0


def _code_report(model, x, args) -> dict:
    """Print and return how sparse and how contractive an autoencoder's code is on ``x``."""
    from ..study import regularity
    from ..viz.figures import sparsity_text

    stats = regularity.code_sparsity(model.codes(x), near_zero(args))
    print(f"{args.split}: code sparsity over {model.config.latent_dim} units: {sparsity_text(stats)}")
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


def _source_text(meta: dict) -> str:
    """Where a run's data came from, in words."""
    if meta.get("dataset_description"):
        return meta["dataset_description"]
    from ..data import dataset_title

    source = meta.get("data_source") or {}
    if source.get("kind") == "builtin":
        title = dataset_title(source.get("name"))
        return title + (f" from {source['data_dir']}" if source.get("data_dir") else "")
    if source.get("kind") == "path":
        return source.get("path", "?") + (f" (targets {source['target']})" if source.get("target") else "")
    return meta.get("dataset") or "not recorded"


def checkpoint_info(path) -> dict:
    """What ``npvae info`` reports, as a JSON-able dict."""
    model, meta = load_model(path)
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
    from ..checkpoint import finite_json, printable

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
    if tc is not None and tc.get("recipe"):
        say(f"recipe: {tc['recipe']} (npvae recipes {tc['recipe']}); departures from the write-up: "
            f"{tc.get('departures') or 'none'}")
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


