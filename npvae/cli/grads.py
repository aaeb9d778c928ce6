"""``npvae grads``: where a VAE's gradient comes from, and how noisy its estimators are."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .. import memory
from .common import MAX_SAMPLES_PER_PASS, CLIError, load_model, output_path
from .inputs import split_data


def _snr_names(args, model, names):
    """The estimators of the --k study (None: every one that applies), checked before any work."""
    from ..models import StandardNormalPrior
    from ..objectives import ESTIMATORS, check_k_sample_model
    from ..study.gradflow import default_estimators

    if not isinstance(model, StandardNormalPrior):
        raise CLIError(f"--k studies the ELBO and IWAE bounds under the prior N(0, I); {args.checkpoint} holds "
                       f"a {model.kind} with a prior of its own")
    check_k_sample_model(model, "the --k study")
    snr_names = None if names is None else [n for n in names if args.objective in ESTIMATORS[n].objectives
                                            and not ESTIMATORS[n].pools_draws]
    measured = snr_names if snr_names is not None else list(default_estimators(args.objective))
    unbiased = [n for n in measured if ESTIMATORS[n].is_unbiased(args.objective)]
    if measured and args.snr_signal == "best" and not unbiased:
        raise CLIError(f"--snr-signal best: none of {','.join(measured)} is unbiased for the {args.objective} gradient")
    if measured and args.snr_signal not in ("own", "best", *unbiased):
        raise CLIError(f"--snr-signal {args.snr_signal}: expected own, best or one of the measured estimators "
                       f"unbiased for the {args.objective} gradient ({','.join(unbiased)})")
    if snr_names == []:
        raise CLIError(f"none of --estimators {','.join(names)} estimates the {args.objective} gradient")
    if args.examples * max(args.k) > MAX_SAMPLES_PER_PASS:
        raise CLIError(f"--k up to {max(args.k)} on --examples {args.examples} images decodes "
                       f"{args.examples * max(args.k):,} samples per draw, more than {MAX_SAMPLES_PER_PASS:,}; "
                       "lower --k or --examples")
    return snr_names


def _estimator_table(args, model, x, labels, names, examples, rng):
    """Print and return the comparison of the estimators of E_q[log p(x|z)] (None when none was asked for)."""
    from ..objectives import ESTIMATORS
    from ..study import gradflow
    from ..viz import figures

    recon_names = None if names is None else [n for n in names if "recon" in ESTIMATORS[n].objectives]
    if recon_names is not None and not recon_names:
        return None
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
    return table


def _snr_study(args, model, x, names, snr_names, examples, rng):
    """Print and return the signal-to-noise rows of the --k study."""
    from ..study import gradflow

    # One k at a time, each said when done (the study can take minutes): the same rows and draws as one
    # call, since the study measures each k in turn from the same generator and carries nothing across k.
    rows, start = [], time.perf_counter()
    print(f"measuring the --k study: {args.snr_draws} draws for each k ...", file=sys.stderr, flush=True)
    for i, k in enumerate(args.k, 1):
        rows += gradflow.estimator_snr(model, x[:examples], [k], args.snr_draws, rng, names=snr_names,
                                       objective=args.objective,
                                       signal=None if args.snr_signal == "own" else args.snr_signal)
        print(f"  k = {k} done ({i}/{len(args.k)}, {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    print()
    dropped = [] if names is None else [n for n in names if n not in snr_names]
    if dropped:
        print(f"({', '.join(dropped)}: not in the k study, which takes one estimate per draw of the "
              f"{args.objective} gradient)")
    print(f"signal-to-noise of the {args.objective} bound's gradient on {examples} {args.split} images, "
          f"k = {', '.join(map(str, args.k))}:")
    print(gradflow.snr_text(rows))
    return rows


def cmd_grads(args) -> int:
    from ..models import GaussianLatent
    from ..objectives.estimators import estimators
    from ..study import gradflow
    from ..viz import figures
    from ..viz.plots import MatplotlibMissing

    model, meta = load_model(args.checkpoint)
    if not isinstance(model, GaussianLatent):
        raise CLIError(f"grads studies a VAE's gradients; {args.checkpoint} holds a {model.kind}")
    names = None if args.estimators is None else [e.name for e in estimators(args.estimators)]
    snr_names = None if args.k is None else _snr_names(args, model, names)
    if args.k is not None:
        memory.check_batch(model, args.examples, f"the --k study on {args.examples} images", "lower --k or --examples",
                           k=max(args.k), training=True, source=f"--k {max(args.k)} --examples {args.examples}")
    dataset, x, y, _ = split_data(args, model, meta, args.n)
    labels = model.check_labels(None if y is None else y.astype(np.int64), len(x))
    examples = min(args.examples, len(x))
    rng = np.random.default_rng(args.seed)
    out = Path(args.out) if args.out is not None else output_path(args, "grads")

    eps = rng.standard_normal((len(x), model.config.latent_dim), dtype=model.dtype)
    rows = gradflow.decomposition_rows(gradflow.decompose_gradients(model, x, eps, y=labels))
    print(f"gradient of the negative ELBO (recon + beta KL, beta = {model.reg_weight:g}) on {len(x)} {args.split} "
          "images, split exactly into its reconstruction and KL parts:")
    print(gradflow.decomposition_text(rows))
    table = _estimator_table(args, model, x, labels, names, examples, rng)
    snr_rows = None if args.k is None else _snr_study(args, model, x, names, snr_names, examples, rng)
    try:  # the tables above are the result; the pictures, with axes, need matplotlib
        print(f"wrote {figures.gradient_decomposition(rows, out / 'decomposition.png', n=len(x))}")
        if table is not None:
            print(f"wrote {figures.estimator_comparison(table, out / 'estimators.png')}")
        if snr_rows is not None:
            print(f"wrote {figures.snr(snr_rows, out / 'snr.png', args.objective)}")
    except MatplotlibMissing as exc:
        print(f"pictures skipped: {exc}", file=sys.stderr)
    return 0
