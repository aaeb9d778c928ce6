"""Reproduce three findings about gradient estimators with npvae's hand-derived estimators.

    python scripts/estimator_study.py toy         # Rainforth et al. 2018 / Tucker et al. 2019: their Gaussian model
    python scripts/estimator_study.py snr         # the same SNR against k on VAEs trained on the demo digits
    python scripts/estimator_study.py landing     # Roeder et al. 2017: STL's variance vanishes at the posterior
    python scripts/estimator_study.py likelihood  # test log-likelihood of VAE, IWAE k=5, 50 and IWAE-DReG
    python scripts/estimator_study.py all

Each part prints a table, writes it (and a picture) under --out (default docs/estimators/), and
runs in minutes on two cores with the defaults; every size is a flag.

toy         Rainforth et al.'s section 4 model: p(z) = N(0, I), p(x|z) = N(z + b, I) in 20 dimensions, so
            p(z|x) = N((x - b) / 2, I / 2); q(z|x) = N(A x + c, 2/3 I) with (A, c) = the posterior's
            mean map plus N(0, s^2) noise, for three s (q near, farther from and far from the posterior).
            For each, the SNR of the IWAE bound's gradient at one point x against k, for reparam, dreg
            and stl (npvae.study.gradflow.estimator_snr; --signal says whose mean is the signal).
snr         Trains a 784-200-20 VAE on the demo digits (ELBO, dynamically binarized), then measures the
            mean, variance and signal-to-noise ratio (|mean| / std over draws, per parameter, averaged)
            of the IWAE bound's gradient for each estimator and k (npvae.study.gradflow.estimator_snr;
            the signal of the unbiased estimators, by default, the mean of the one varying least).
landing     A linear Gaussian model p(z) = N(0, I), p(x|z) = N(Wz + b, I) with orthogonal columns of W,
            whose exact posterior is a diagonal Gaussian linear in x, so a linear encoder can be exact.
            Its encoder moves from a perturbed point (t = 0) to the exact posterior (t = 1); at each t
            the variance of the ELBO's encoder gradient (k = 1) is measured for reparam and stl.
likelihood  Trains the same architecture with each objective for the same epochs, then estimates
            -log p(x) on test images by importance sampling (npvae.study.likelihood.iwae_log_likelihood).
            MNIST: trained on the 4,500 demo digits (MNIST training images shipped with npvae), tested
            on the official t10k images; Fashion-MNIST: the first 4,500 training images, tested on
            its t10k images. The files are found as npvae finds them (--data-dir, $NPVAE_DATA_DIR,
            the cache) or downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import npvae
from npvae import data
from npvae.study import gradflow
from npvae.study.likelihood import iwae_log_likelihood
from npvae.viz import figures


def binarized(images: np.ndarray, seed: int) -> np.ndarray:
    return data.binarize_static(data.to_float(images), np.random.default_rng(seed))


def say(line: str) -> None:
    """Progress, on stderr: the tables on stdout stay what the docs pages keep."""
    print(line, file=sys.stderr, flush=True)


def train(x: np.ndarray, epochs: int, seed: int, hidden: int, latent: int, **objective) -> npvae.VAE:
    model = npvae.VAE(784, (hidden,), latent, seed=seed)
    npvae.fit(model, x, epochs=epochs, batch_size=100, lr=1e-3, seed=seed, binarize="dynamic", patience=None,
              **objective)
    return model


# ----------------------------------------------------------------------------- Rainforth et al.


def part_snr(args, out: Path) -> None:
    demo = data.load_demo()
    start = time.perf_counter()
    say(f"snr: training a 784-200-{args.snr_latent} VAE for {args.snr_epochs} epochs ...")
    model = train(demo.train_x, args.snr_epochs, 0, 200, args.snr_latent)
    x = binarized(demo.val_x[: args.snr_examples], 1)
    rows, rng = [], np.random.default_rng(2)
    for i, k in enumerate(args.snr_k, 1):  # one k at a time, said when done: the same rows as one call
        rows += gradflow.estimator_snr(model, x, [k], args.snr_draws, rng, names=["reparam", "score", "stl", "dreg"],
                                       objective="iwae", signal=args.signal)
        say(f"snr: k = {k} done ({i}/{len(args.snr_k)}, {time.perf_counter() - start:.0f} s)")
    ks = sorted(args.snr_k)
    slopes = [f"slope d log SNR / d log k from k = {ks[0]} to {ks[-1]} (and from {ks[-2]} to {ks[-1]}); paper: encoder "
              "reparam -0.5, dreg +0.5, decoder +0.5"]
    for name, group in (("reparam", "encoder"), ("dreg", "encoder"), ("stl", "encoder"), ("reparam", "decoder")):
        slopes.append(f"  {group} {name if group == 'encoder' else '(every estimator)'}: "
                      f"{slope(rows, name, group, ks[0], ks[-1]):+.2f} ({slope(rows, name, group, ks[-2], ks[-1]):+.2f})")
    text = (f"784-200-{args.snr_latent} VAE, {args.snr_epochs} ELBO epochs on the demo digits; {args.snr_examples} validation "
            f"digits; {time.perf_counter() - start:.0f} s\n" + gradflow.snr_text(rows) + "\n" + "\n".join(slopes))
    print(text)
    (out / f"snr_z{args.snr_latent}.json").write_text(json.dumps(rows, indent=1))
    (out / f"snr_z{args.snr_latent}.txt").write_text(text + "\n")
    print(f"wrote {figures.snr(rows, out / f'snr_z{args.snr_latent}.png')}")


# ----------------------------------------------------------------------------- Rainforth et al.'s Gaussian model


def rainforth_gaussian(d: int, perturbation: float, seed: int):
    """Rainforth et al. (2018, section 4)'s model as an npvae VAE, at one point x.

    p(z) = N(0, I), p(x|z) = N(z + b, I) (their N(z; mu, I) prior shifted to the origin: b = mu), so
    p(z|x) = N((x - b) / 2, I / 2). The encoder is linear, q(z|x) = N(A x + c, 2/3 I) as theirs, its
    variance 4/3 of the posterior's (so the weights p/q are bounded), and its mean map
    (A, c) the posterior's, (I / 2, -b / 2), plus N(0, perturbation^2) noise on every entry.

    Returns
    -------
    model : VAE (float64), x : (1, d) array in [0, 1], kl : KL(q(z|x) || p(z|x)) at x, nats
    """
    rng = np.random.default_rng(seed)
    model = npvae.VAE(d, (), d, likelihood="gaussian", dtype=np.float64, seed=seed)
    model.decoder.layers[-1].activation = "identity"
    p = model.parameters()
    b = rng.random(d)
    p["decoder.0.weight"][...] = np.eye(d)
    p["decoder.0.bias"][...] = b
    p["mu.weight"][...] = np.eye(d) / 2 + rng.normal(0.0, perturbation, (d, d))
    p["mu.bias"][...] = -b / 2 + rng.normal(0.0, perturbation, d)
    p["logvar.weight"][...] = 0.0
    p["logvar.bias"][...] = math.log(2 / 3)
    x = rng.random((1, d))
    mu, logvar = model.encode(x)
    kl = 0.5 * (math.log(0.5) - logvar + (np.exp(logvar) + (mu - (x - b) / 2) ** 2) / 0.5 - 1).sum()
    return model, x, float(kl)


def slope(rows, name, group, k_lo, k_hi) -> float:
    """d log SNR / d log k between k_lo and k_hi."""
    snr = {r["k"]: r["snr"] for r in rows if r["estimator"] == name and r["group"] == group}
    return math.log(snr[k_hi] / snr[k_lo]) / math.log(k_hi / k_lo)


TOY_NAMES = ("reparam", "dreg", "stl")


def signal_text(signal) -> str:
    if signal is None:
        return "each estimator's own mean"
    which = ("per parameter, the mean of the unbiased estimator (reparam or dreg) whose draws vary least"
             if signal == "best" else f"{signal}'s mean")
    return f"{which} (the same gradient for every unbiased estimator; stl, biased: its own mean)"


def part_toy(args, out: Path) -> None:
    start = time.perf_counter()
    runs = []
    for s in args.toy_perturbations:
        model, x, kl = rainforth_gaussian(args.toy_dim, s, 0)
        rows = gradflow.estimator_snr(model, x, args.toy_k, args.toy_draws, np.random.default_rng(1),
                                      names=list(TOY_NAMES), objective="iwae", signal=args.signal)
        runs.append({"perturbation": s, "kl": kl, "rows": rows})
        print(f"perturbation {s}: KL(q || p(z|x)) = {kl:.3g} nats ({time.perf_counter() - start:.0f} s)", flush=True)
    ks = sorted(args.toy_k)
    lo, hi = (ks[-3] if len(ks) >= 3 else ks[0]), ks[-1]
    lines = [f"Rainforth et al.'s Gaussian model, D = Z = {args.toy_dim}, q = N(A x + c, 2/3 I) with (A, c) = the posterior's "
             f"mean map + N(0, s^2) noise; gradient of the IWAE bound at one x, {args.toy_draws} draws per k; SNR per "
             f"parameter = |E g| / std, mean over the encoder's (decoder's) parameters; E g: {signal_text(args.signal)}; floor: the SNR "
             f"reparam's draws would show if E g were 0; slope: d log SNR / d log k from k = {lo} to {hi}; "
             f"{time.perf_counter() - start:.0f} s",
             f"{'s':>5} {'KL':>7} {'k':>5} {'ESS/k':>6} {'reparam':>9} {'dreg':>9} {'stl':>9} {'decoder':>9} {'floor':>8}"]
    for run in runs:
        rows = run["rows"]
        for k in ks:
            enc = {r["estimator"]: r for r in rows if r["k"] == k and r["group"] == "encoder"}
            dec = next(r for r in rows if r["k"] == k and r["group"] == "decoder")
            lines.append(f"{run['perturbation']:>5g} {run['kl']:>7.3g} {k:>5} {dec['ess'] / k:>6.3f} "
                         + " ".join(f"{enc[n]['snr']:>9.3g}" for n in TOY_NAMES)
                         + f" {dec['snr']:>9.3g} {enc['reparam']['floor']:>8.2g}")
        run["slopes"] = {f"encoder {n}": slope(rows, n, "encoder", lo, hi) for n in TOY_NAMES}
        run["slopes"]["decoder"] = slope(rows, "reparam", "decoder", lo, hi)
        lines.append(f"{'':>5} {'slope':>7} {f'{lo}-{hi}':>12} " + " ".join(f"{run['slopes'][f'encoder {n}']:>+9.2f}" for n in TOY_NAMES)
                     + f" {run['slopes']['decoder']:>+9.2f}")
    lines.append("paper (large k): reparam -0.5 (Rainforth et al.), dreg +0.5 (Tucker et al.), decoder +0.5")
    text = "\n".join(lines)
    print(text)
    (out / "toy.txt").write_text(text + "\n")
    (out / "toy.json").write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k.startswith("toy")},
                                              "runs": runs}, indent=1))
    print(f"wrote {toy_figure(runs, out / 'toy.png')}")


def toy_figure(runs, path: Path) -> Path:
    """One panel per perturbation: SNR against k for each encoder estimator and the decoder, the papers'
    rates as guides through the last points, and each estimator's noise floor dotted."""
    from npvae.viz.plots import _new_figure, _save

    fig, axes = _new_figure((5.0 * len(runs), 4.8), ncols=len(runs))
    axes = np.atleast_1d(axes)
    styles = {("encoder", "reparam"): ("C0", "o", -0.5), ("encoder", "dreg"): ("C3", "D", 0.5),
              ("encoder", "stl"): ("C2", "s", None), ("decoder", "reparam"): ("k", "^", 0.5)}
    for ax, run in zip(axes, runs):
        rows = run["rows"]
        for (group, name), (color, marker, rate) in styles.items():
            pts = sorted((r["k"], r["snr"], r["floor"]) for r in rows if r["estimator"] == name and r["group"] == group)
            k, snr, floor = (np.array(v, dtype=np.float64) for v in zip(*pts))
            label = "decoder (every estimator)" if group == "decoder" else f"encoder, {name}" + (" (biased)" if name == "stl" else "")
            ax.plot(k, snr, marker=marker, color=color, label=label, linewidth=1.5, markersize=5)
            if group == "encoder" and name != "stl":
                ax.plot(k, floor, linestyle=":", color=color, linewidth=1)
            if rate is not None:
                ax.plot(k[[0, -1]], snr[-1] * (k[[0, -1]] / k[-1]) ** rate, linestyle="--", color=color, linewidth=1,
                        alpha=0.7)  # in its curve's colour: each guide says whose rate it is
        k_max = max(r["k"] for r in rows)
        ess = next(r["ess"] for r in rows if r["k"] == k_max)
        ax.set_title(f"s = {run['perturbation']:g}: KL(q || p(z|x)) = {run['kl']:.2g} nats\n"
                     f"ESS = {ess:.3g} of k = {k_max} samples", fontsize=11)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("k (samples)", fontsize=10)
        ax.grid(which="both", alpha=0.3, linewidth=0.5)
    axes[0].set_ylabel("SNR = |E g| / std, mean over parameters", fontsize=10)
    axes[0].plot([], [], linestyle="--", color="0.4", label="papers' rates, k^(±1/2), in each curve's colour")
    axes[0].plot([], [], linestyle=":", color="0.3", label="noise floor of the draws")
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle("IWAE gradient SNR on Rainforth et al.'s Gaussian model, q moving away from the posterior "
                 "(left to right)", fontsize=12)
    return _save(fig, path)


# ----------------------------------------------------------------------------- Roeder et al.


def linear_gaussian(d: int, z: int, seed: int):
    """A VAE with a linear decoder mean and unit variance, its exact-posterior encoder parameters, and W."""
    rng = np.random.default_rng(seed)
    model = npvae.VAE(d, (), z, likelihood="gaussian", dtype=np.float64, seed=seed)
    model.decoder.layers[-1].activation = "identity"  # mean W z + b: the posterior is Gaussian
    w = np.linalg.qr(rng.standard_normal((d, z)))[0] * np.linspace(2.0, 0.5, z)  # orthogonal columns
    p = model.parameters()
    p["decoder.0.weight"][...] = w
    p["decoder.0.bias"][...] = 0.5
    s = 1.0 / (1.0 + (w**2).sum(0))  # posterior variances: (I + W^T W)^-1, diagonal
    exact = {"mu.weight": s[:, None] * w.T, "mu.bias": -(s[:, None] * w.T) @ p["decoder.0.bias"],
             "logvar.weight": np.zeros((z, d)), "logvar.bias": np.log(s)}
    return model, exact, w


def posterior_kl(model, x, exact) -> float:
    """Mean over x of KL(q(z|x) || p(z|x)), both diagonal Gaussians."""
    mu, logvar = model.encode(x)
    mu_p = x @ exact["mu.weight"].T + exact["mu.bias"]
    lv_p = exact["logvar.bias"]
    kl = 0.5 * (lv_p - logvar + (np.exp(logvar) + (mu - mu_p) ** 2) / np.exp(lv_p) - 1).sum(1)
    return float(kl.mean())


def part_landing(args, out: Path) -> None:
    model, exact, _ = linear_gaussian(20, 4, 0)
    rng = np.random.default_rng(1)
    x = rng.random((args.landing_examples, 20))
    delta = {k: rng.normal(0, 0.3, v.shape) for k, v in exact.items()}
    lines = ["t = 0: perturbed encoder, t = 1: the exact posterior; ELBO gradient, k = 1, "
             f"{args.landing_draws} draws on {len(x)} points; variance = mean over encoder parameters",
             f"{'t':>6} {'KL(q||p(z|x))':>14} {'var reparam':>12} {'var stl':>12} {'stl/reparam':>12}"]
    table = []
    for t in (0.0, 0.5, 0.75, 0.9, 0.97, 0.99, 0.999, 1.0):
        params = model.parameters()
        for key in exact:
            params[key][...] = exact[key] + (1 - t) * delta[key]
        rows = gradflow.estimator_snr(model, x, [1], args.landing_draws, np.random.default_rng(2),
                                      names=["reparam", "stl"], objective="elbo")
        var = {r["estimator"]: r["var"] for r in rows if r["group"] == "encoder"}
        kl = posterior_kl(model, x, exact)
        table.append({"t": t, "kl": kl, **{f"var_{k}": v for k, v in var.items()}})
        lines.append(f"{t:>6.3f} {kl:>14.3g} {var['reparam']:>12.3g} {var['stl']:>12.3g} "
                     f"{var['stl'] / var['reparam']:>12.3g}")
        say(f"landing: t = {t} done")
    text = "\n".join(lines)
    print(text)
    (out / "landing.txt").write_text(text + "\n")
    (out / "landing.json").write_text(json.dumps(table, indent=1))
    from npvae.viz.plots import _new_figure, _save

    fig, ax = _new_figure((6.5, 4.4))
    inexact = [r for r in table if r["t"] < 1]  # KL = 0 at t = 1 has no place on a log axis: said in the title
    kl = np.array([r["kl"] for r in inexact])
    exact_row = table[-1]
    for name, color, marker in (("reparam", "C0", "o"), ("stl", "C2", "D")):
        ax.plot(kl, [r[f"var_{name}"] for r in inexact], marker=marker, color=color,
                label={"reparam": "reparameterization", "stl": "sticking the landing"}[name]
                + f" (at q = posterior: {exact_row[f'var_{name}']:.2g})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("KL(q(z|x) || p(z|x)), nats: q approaches the exact posterior to the right", fontsize=10)
    ax.set_ylabel("variance of the encoder gradient", fontsize=10)
    ax.set_title("ELBO gradient variance (k = 1) as q approaches the exact posterior", fontsize=11)
    ax.grid(which="both", alpha=0.3, linewidth=0.5)
    ax.legend(fontsize=9, frameon=False)
    print(f"wrote {_save(fig, out / 'landing.png')}")


# ----------------------------------------------------------------------------- test log-likelihood


RUNS = (("VAE", dict()), ("IWAE k=5", dict(objective="iwae", k=5)), ("IWAE k=50", dict(objective="iwae", k=50)),
        ("IWAE-DReG k=50", dict(objective="iwae", k=50, estimator="dreg")))


def part_likelihood(args, out: Path) -> None:
    n = args.train_images
    sets = {"MNIST": (data.load_demo().train_x[:n], data.load_mnist_like("mnist", "test", data_dir=args.data_dir)[0]),
            "Fashion-MNIST": (data.load_mnist_like("fashion-mnist", "train", data_dir=args.data_dir)[0][:n],
                              data.load_mnist_like("fashion-mnist", "test", data_dir=args.data_dir)[0])}
    results = []
    for name, (train_x, test_x) in sets.items():
        test = binarized(test_x.reshape(len(test_x), -1)[: args.test_images], 3)
        vae_log_px = None
        for label, objective in RUNS:
            start = time.perf_counter()
            model = train(train_x.reshape(len(train_x), -1), args.epochs, 0, 200, 20, **objective)
            seconds = time.perf_counter() - start
            log_px = iwae_log_likelihood(model, test, args.eval_k, np.random.default_rng(4))
            vae_log_px = log_px if vae_log_px is None else vae_log_px  # RUNS starts with the VAE
            gain = log_px - vae_log_px  # paired over the same test images
            row = {"data": name, "model": label, "nll": float(-log_px.mean()),
                   "se": float(log_px.std(ddof=1) / math.sqrt(len(log_px))), "gain": float(gain.mean()),
                   "gain_se": float(gain.std(ddof=1) / math.sqrt(len(gain))), "train_seconds": seconds}
            results.append(row)
            print(f"{name:<14} {label:<15} -log p(x) {row['nll']:.2f} ± {row['se']:.2f}  ({seconds:.0f} s training)",
                  flush=True)
    lines = [f"784-200-20 ReLU VAE, Adam 1e-3, batch 100, {args.epochs} epochs on {n:,} dynamically binarized training "
             f"images; -log p(x) by IWAE with k = {args.eval_k} on the first {args.test_images} t10k images "
             "(one fixed binarization), nats, ± one standard error over the images; better than VAE: the mean "
             "per-image gain in log p(x) over the VAE on the same images, ± its standard error",
             f"{'data':<14} {'model':<15} {'-log p(x)':>10} {'± se':>6} {'better than VAE':>16} {'± se':>6}"]
    lines += [f"{r['data']:<14} {r['model']:<15} {r['nll']:>10.2f} {r['se']:>6.2f} {r['gain']:>16.2f} {r['gain_se']:>6.2f}"
              for r in results]
    text = "\n".join(lines)
    print(text)
    (out / "likelihood.txt").write_text(text + "\n")
    (out / "likelihood.json").write_text(json.dumps({"settings": vars(args), "rows": results}, indent=1, default=str))


def main() -> None:
    from npvae.cli.parser import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("part", choices=("toy", "snr", "landing", "likelihood", "all"), help="which study to run")
    p.add_argument("--out", default="runs/estimators",
                   help="folder for the pictures and tables (docs/estimators for the committed ones)")
    p.add_argument("--snr-epochs", type=int, default=10, help="snr: training epochs of the model studied")
    p.add_argument("--snr-k", type=lambda s: [int(v) for v in s.split(",")], default=[1, 10, 100, 1000],
                   help="snr: the k of the k-sample bound, comma-separated")
    p.add_argument("--snr-draws", type=int, default=200, help="snr: draws per estimator and k")
    p.add_argument("--snr-examples", type=int, default=1, help="snr: images studied")
    p.add_argument("--snr-latent", type=int, default=20, help="snr: latent dimensions of the model")
    p.add_argument("--signal", default="best", type=lambda s: None if s == "own" else s,
                   help="toy, snr: whose mean is the signal of every unbiased estimator: best (per parameter, the one "
                        "varying least), an estimator's name, or own (each its own mean)")
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--toy-perturbations", type=lambda s: [float(v) for v in s.split(",")], default=[0.01, 0.1, 0.3],
                   help="toy: std of the noise on q's mean map, one panel each")
    p.add_argument("--toy-k", type=ints, default=[1, 3, 10, 30, 100, 300, 1000], help="toy: the k, comma-separated")
    p.add_argument("--toy-draws", type=int, default=2000, help="toy: draws per estimator and k")
    p.add_argument("--toy-dim", type=int, default=20, help="toy: D = Z")
    p.add_argument("--landing-draws", type=int, default=2000, help="landing: draws per estimator")
    p.add_argument("--landing-examples", type=int, default=8, help="landing: images studied")
    p.add_argument("--epochs", type=int, default=5, help="likelihood: training epochs of every model")
    p.add_argument("--train-images", type=int, default=4500, help="likelihood: training images per data set")
    p.add_argument("--eval-k", type=int, default=5000, help="likelihood: importance samples per test image")
    p.add_argument("--test-images", type=int, default=100, help="likelihood: test images scored per data set")
    p.add_argument("--data-dir", default=None, help="likelihood: folder holding mnist/ and fashion-mnist/ (or "
                   "their files) (default: npvae's usual places: $NPVAE_DATA_DIR, the cache, then download)")
    args = p.parse_args()
    for flag in ("toy_k", "snr_k"):
        ks = sorted(set(getattr(args, flag)))
        if len(ks) < 2 or ks[0] < 1:
            p.error(f"--{flag.replace('_', '-')}: expected two or more k >= 1 (the slopes need two), got {getattr(args, flag)}")
        setattr(args, flag, ks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for part, run in (("toy", part_toy), ("snr", part_snr), ("landing", part_landing), ("likelihood", part_likelihood)):
        if args.part in (part, "all"):
            try:
                run(args, out)
            except (FileNotFoundError, data.DownloadError) as exc:  # the data's own one-line hint, no traceback
                sys.exit(f"estimator_study.py {part}: {exc}")


if __name__ == "__main__":
    main()
