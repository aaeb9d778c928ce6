"""Gradient-flow study tools: where a VAE's gradient comes from, and how noisy its estimators are.

- :func:`decompose_gradients` splits every parameter's gradient of the batch-mean loss
  ``recon + beta * KL`` exactly into its reconstruction and KL parts (the model's backward with one
  upstream gradient set to zero), and :func:`decomposition_rows` summarises the split per parameter.
- :func:`compare_estimators` runs every estimator of :mod:`npvae.objectives.estimators` (the
  reparameterization gradient, the score function with and without a baseline) on the same draws
  of the gradient of the expected reconstruction term with respect to the encoder's outputs.

Per-layer gradient norms over training come from the trainer (``--log-grad-norms``) and are drawn
by ``npvae plot CKPT grad-norms``.
"""

from __future__ import annotations

import math

import numpy as np

from ..models import GaussianLatent
from ..objectives import ESTIMATORS, Draws, check_k_sample_model, encoder_backward, k_sample_draws, reduce_draws
from ..objectives.estimators import estimators

OBJECTIVE = "E_q[log p(x|z)]"  # what compare_estimators differentiates (to be maximised)
DEFAULT_ROWS = 8192  # draws per forward pass in compare_estimators


def default_estimators(objective: str) -> tuple[str, ...]:
    """The estimators a study of ``objective`` ("recon", "elbo" or "iwae") measures when none are named:
    every registered one that estimates its gradient, in registry order; for the k-sample bounds only
    those that take one draw each (there every draw is one estimate of the batch's gradient, so a
    baseline pooling draws of one image does not apply)."""
    return tuple(e.name for e in estimators() if objective in e.objectives
                 and (objective == "recon" or not e.pools_draws))


def _check_vae_family(model, what: str) -> None:
    if not isinstance(model, GaussianLatent):
        raise ValueError(f"{what} needs a VAE or CVAE (a reparameterized q(z|x) and a KL term), got a "
                         f"{getattr(model, 'kind', type(model).__name__)} model")


# ----------------------------------------------------------------------------- reconstruction vs KL


def decompose_gradients(model, x, eps, y=None) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Split each parameter's gradient into its reconstruction and (beta-weighted) KL parts.

    For the batch-mean loss :math:`L = \\frac1B \\sum_i \\text{recon}_i + \\beta\\, \\text{KL}_i`,

    .. math:: \\nabla L = \\underbrace{\\tfrac1B \\textstyle\\sum_i \\nabla \\text{recon}_i}_{\\text{recon part}}
              + \\underbrace{\\tfrac{\\beta}{B} \\textstyle\\sum_i \\nabla \\text{KL}_i}_{\\text{KL part}}

    Each part is one backward pass with the other part's upstream gradient set to zero; the total
    is a third pass with both, so that ``recon + kl == total`` is a check, not a definition. The
    KL part of every decoder parameter is exactly zero.

    Parameters
    ----------
    model : VAE or CVAE (beta is ``model.reg_weight``, as in training)
    x : (B, D) array in the model's value range
    eps : (B, Z) array, the reparameterization noise
    y : (B,) integer array, for a CVAE

    Returns
    -------
    parts : dict of name -> (recon_part, kl_part, total)
        Copies, keyed and shaped like :meth:`state_dict`. Overwrites ``model.params.grad``.
    """
    _check_vae_family(model, "the gradient decomposition")
    x = model.check_input(x)
    y = model.check_labels(y, len(x))
    model.forward(x, y, eps=model.check_noise(x, eps))
    batch = len(x)
    zero = np.zeros(batch, model.dtype)
    recon_scale = np.full(batch, 1.0 / batch, model.dtype)
    kl_scale = np.full(batch, model.reg_weight / batch, model.dtype)
    passes = []
    for drecon, dkl in ((recon_scale, zero), (zero, kl_scale), (recon_scale, kl_scale)):
        model.backward(drecon, dkl)
        passes.append({name: g.copy() for name, g in model.gradients().items()})
    return {name: tuple(p[name] for p in passes) for name in passes[0]}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """cos(a, b); NaN when either is zero (the direction is undefined)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return math.nan
    return float(np.dot(a.ravel().astype(np.float64), b.ravel().astype(np.float64)) / (na * nb))


def decomposition_rows(parts: dict) -> list[dict]:
    """One summary row per parameter of :func:`decompose_gradients`' output, in forward order.

    Returns
    -------
    rows : list of dict
        ``param``; ``recon_norm``, ``kl_norm``, ``total_norm`` (Frobenius norms of each part);
        ``cosine``: cos(recon part, KL part), NaN where a part is zero (every decoder parameter);
        ``kl_share``: ``kl_norm / (recon_norm + kl_norm)``, 0 = all reconstruction, 1 = all KL.
    """
    rows = []
    for name, (recon, kl, total) in parts.items():
        r, k = float(np.linalg.norm(recon)), float(np.linalg.norm(kl))
        rows.append({"param": name, "recon_norm": r, "kl_norm": k, "total_norm": float(np.linalg.norm(total)),
                     "cosine": _cosine(recon, kl), "kl_share": k / (r + k) if r + k > 0 else math.nan})
    return rows


def decomposition_text(rows: list[dict]) -> str:
    """The rows of :func:`decomposition_rows` as an aligned plain-text table."""
    width = max(len("parameter"), *(len(r["param"]) for r in rows))
    lines = [f"{'parameter':<{width}}  {'|recon|':>10}  {'|KL|':>10}  {'|total|':>10}  {'cos(recon,KL)':>13}  {'KL share':>8}"]
    for r in rows:
        cos = "n/a" if math.isnan(r["cosine"]) else f"{r['cosine']:+.3f}"
        share = "n/a" if math.isnan(r["kl_share"]) else f"{r['kl_share']:.3f}"
        lines.append(f"{r['param']:<{width}}  {r['recon_norm']:>10.4g}  {r['kl_norm']:>10.4g}  "
                     f"{r['total_norm']:>10.4g}  {cos:>13}  {share:>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reparameterization vs score function


def compare_estimators(model, x, n_draws: int, rng: np.random.Generator, y=None,
                       batch_size: int | None = None, names=None) -> dict:
    """Estimates of the gradient of f = E_q[log p(x|z)] by every registered estimator, on the same draws.

    For each example, ``n_draws`` draws ``z = mu + std * eps`` feed every estimator of
    :data:`npvae.objectives.estimators.ESTIMATORS` that applies to f (reparameterization, score function,
    score function with a leave-one-out baseline; formulas there). f(z) = log p(x|z); the pathwise gradient is the
    model's own backward pass through the decoder, the score d log q(z|x) / d(mu, logvar) at fixed
    z is ``[eps / std, (eps^2 - 1) / 2]``. All of them estimate the same gradient, with respect to
    the mean and (clamped, with ``logvar_bounds``) log-variance that q uses.

    Parameters
    ----------
    model : VAE or CVAE
    x : (N, D) array, a few examples (the table has 2 N Z rows)
    n_draws : int >= 2
        Independent draws of z per example.
    rng : np.random.Generator
    y : (N,) integer array, for a CVAE
    batch_size : int, optional
        Draws per forward pass (default 8192).
    names : sequence of str, optional
        Which estimators (default all that apply to f, in registry order).

    Returns
    -------
    table : dict of columns, each a list with one entry per (example, parameter) row
        ``param`` (e.g. ``"x0 mu[1]"``), ``example``, ``dim``, ``wrt`` ("mu" or "logvar");
        for each estimator name: ``_mean``, ``_var`` (variance of one draw's estimate, ddof 1) and
        ``_se`` (standard error of the mean, sqrt(var / n_draws)); plus ``estimators`` (the names
        in order), ``labels`` (name -> label), ``n_draws`` and ``objective`` (:data:`OBJECTIVE`).
        The layout is what :func:`npvae.viz.plots.plot_estimator_comparison` reads. Overwrites
        ``model.params.grad``.
    """
    _check_vae_family(model, "the estimator comparison")
    if isinstance(n_draws, bool) or not isinstance(n_draws, (int, np.integer)) or n_draws < 2:
        raise ValueError(f"expected n_draws >= 2 (variances need two draws), got {n_draws!r}")
    chosen = estimators(names if names is not None else default_estimators("recon"))
    wrong = [e.name for e in chosen if "recon" not in e.objectives]
    if wrong:
        raise ValueError(f"estimators {wrong} do not estimate the gradient of {OBJECTIVE} (they are for "
                         f"{', '.join(sorted({o for e in chosen if e.name in wrong for o in e.objectives}))})")
    x = model.check_input(x)
    y = model.check_labels(y, len(x))
    rows = DEFAULT_ROWS if batch_size is None else int(batch_size)
    zdim = model.config.latent_dim
    table = {"param": [], "example": [], "dim": [], "wrt": []}
    table.update({f"{e.name}_{s}": [] for e in chosen for s in ("mean", "var", "se")})
    for i in range(len(x)):
        parts = []
        for start in range(0, n_draws, rows):
            n = min(rows, n_draws - start)
            xs = np.repeat(x[i : i + 1], n, axis=0)
            ys = None if y is None else np.repeat(y[i : i + 1], n)
            eps = rng.standard_normal((n, 1, zdim), dtype=model.dtype)
            parts.append(sample_draws(model, xs, eps, "recon", ys))
        draws = Draws("recon", *(np.concatenate([getattr(p, f) for p in parts])
                                 for f in ("log_w", "weights", "bound", "path", "score", "direct")))
        estimates = {e.name: e.estimate(draws) for e in chosen}
        for col in range(2 * zdim):
            wrt, dim = ("mu", col) if col < zdim else ("logvar", col - zdim)
            table["param"].append(f"x{i} {wrt}[{dim}]")
            table["example"].append(i)
            table["dim"].append(dim)
            table["wrt"].append(wrt)
            for name, values in estimates.items():
                v = values[:, col]
                var = float(v.var(ddof=1))
                table[f"{name}_mean"].append(float(v.mean()))
                table[f"{name}_var"].append(var)
                table[f"{name}_se"].append(math.sqrt(var / n_draws))
    table["estimators"] = tuple(e.name for e in chosen)  # a tuple: the per-row columns are the lists
    table["labels"] = {e.name: e.label for e in chosen}
    table["n_draws"] = int(n_draws)
    table["objective"] = OBJECTIVE
    return table


def sample_draws(model, x, eps, objective: str, y=None) -> Draws:
    """:class:`Draws` of ``objective`` for the rows of x (B, ...) with noise eps (B, k, Z): one
    forward and one decoder backward (:func:`npvae.objectives.k_sample_draws`; a conditional model's
    ``recon`` runs through its own forward and backward, its labels y (B,))."""
    if objective == "recon" and y is not None:  # a CVAE: q(z | x, y) and p(x | z, y) via the full model
        n, k, zdim = eps.shape
        if k != 1:
            raise ValueError("the reconstruction study of a conditional model takes k = 1")
        recon, _ = model.forward(x, y, eps=eps[:, 0])
        model.backward(np.full(n, -1.0, model.dtype), np.zeros(n, model.dtype))  # d f / d[mu, logvar]
        dmu, _ = model.latent_grads(n)
        _, logvar = model.posterior_forward(x, y)
        return reduce_draws("recon", -recon.astype(np.float64)[:, None], dmu.astype(np.float64)[:, None],
                            eps, logvar)
    return k_sample_draws(model, x, eps, objective, 1.0)[0]


def select_dims(table: dict, dims) -> dict:
    """The rows of a :func:`compare_estimators` table whose latent dimension is in ``dims``."""
    dims = {int(d) for d in dims}
    keep = [r for r, d in enumerate(table["dim"]) if d in dims]
    if not keep:
        raise ValueError(f"no rows for latent dimensions {sorted(dims)}; the table has {sorted(set(table['dim']))}")
    return {k: [v[r] for r in keep] if isinstance(v, list) else v for k, v in table.items()}


def estimator_text(table: dict) -> str:
    """The table of :func:`compare_estimators` as aligned plain text: each estimator's mean and standard
    error, then each one's per-draw variance relative to the first estimator's."""
    names = list(table["estimators"])
    first = names[0]
    width = max(len("parameter"), *(len(p) for p in table["param"]))
    ratios = [f"var {n}/{first}" for n in names[1:]]
    head = f"{'parameter':<{width}}  " + "  ".join(f"{n:>10} {'± se':>9}" for n in names)
    head += "".join(f"  {r:>{max(len(r), 10)}}" for r in ratios)
    lines = [f"gradient of {table['objective']} w.r.t. q's parameters, {table['n_draws']} draws per example", head]
    for r in range(len(table["param"])):
        base = table[f"{first}_var"][r]
        cells = "  ".join(f"{table[f'{n}_mean'][r]:>10.4g} {table[f'{n}_se'][r]:>9.3g}" for n in names)
        for n, label in zip(names[1:], ratios):
            value = f"{table[f'{n}_var'][r] / base:.3g}" if base > 0 else "inf"
            cells += f"  {value:>{max(len(label), 10)}}"
        lines.append(f"{table['param'][r]:<{width}}  {cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- signal-to-noise against k


def _group(key: str) -> str:
    return "decoder" if key.startswith("decoder.") else "encoder"


def estimator_snr(model, x, ks, n_draws: int, rng: np.random.Generator, names=None, objective: str = "iwae",
                  signal: str | None = None) -> list[dict]:
    r"""Mean, variance and signal-to-noise ratio of each estimator's gradient of a k-sample bound, per k.

    Each draw takes fresh noise eps (N, k, Z) for the batch x and gives one estimate of the gradient of
    the batch-mean bound ``(1/N) sum_i bound_i`` (to be maximised) with respect to every parameter:
    the decoder's, ``sum_j w_ij grad log p(x_i | z_ij)``, is shared by all estimators; the encoder's
    (encoder layers and the mu / logvar heads) comes from each estimator's d bound / d[mu, logvar]
    through the encoder's backward. Over ``n_draws`` draws, per parameter p,

    .. math:: \mathrm{SNR}_p = |\bar g_p| / s_p, \quad \bar g_p = \text{mean}, \quad s_p^2 = \text{variance (ddof 1)}

    (Rainforth et al. 2018), summarised per group over the parameters whose variance is not zero.

    The estimate |mean| / std is biased upwards when the true SNR is small: an estimator whose mean
    is zero still shows :math:`E|\bar g|/s \approx \sqrt{2/(\pi n)}` (0.056 for n = 200), so a
    falling SNR flattens onto that floor (``floor`` in the rows). Every estimator unbiased for the
    objective has the same mean, the gradient itself; ``signal`` names one of them whose mean over
    the draws is taken as that common mean for every unbiased estimator, each keeping its own std, or
    is ``"best"``: per parameter, the mean of the unbiased estimator whose draws vary least there
    (DReG near the posterior, not always). A biased estimator (stl for IWAE) keeps its own mean.

    Parameters
    ----------
    model : VAE with the prior N(0, I) and beta = 1
    x : (N, ...) array in the model's range, the batch (a few images)
    ks : sequence of int >= 1
    n_draws : int >= 2
    rng : np.random.Generator
    names : sequence of str, optional
        Estimators (default: those of the registry that estimate ``objective`` from one draw each,
        so not the leave-one-out baseline).
    objective : "elbo" or "iwae"
    signal : str, optional
        An estimator among ``names``, unbiased for ``objective``, whose mean is the signal of every
        unbiased estimator, or ``"best"`` (see above); default: each estimator's own mean.

    Returns
    -------
    rows : list of dict
        One per (estimator, k, group) in that order, group "encoder" or "decoder": ``estimator``,
        ``k``, ``group``, ``mean_abs`` (mean over parameters of |mean|), ``var`` (mean over
        parameters of the variance), ``snr`` (mean over parameters of SNR_p), ``median_snr``,
        ``params`` (parameters counted), ``n_draws``, ``objective``, ``signal`` (the estimator whose
        mean is the signal, or "best"), ``floor`` (mean over parameters of :math:`\sqrt{2/(\pi n)}\, s_{signal} / s`,
        the SNR these draws would show on average if the gradient were zero), and ``ess``: the mean over draws
        and images of the effective sample size 1 / sum_j w_j^2 of the normalized weights (k for the
        ELBO; for IWAE, how many of the k samples carry the bound: the asymptotics of Rainforth et al.
        and Tucker et al. need it large).
    """
    check_k_sample_model(model, "the signal-to-noise study")
    if objective not in ("elbo", "iwae"):
        raise ValueError(f"expected objective 'elbo' or 'iwae', got {objective!r}")
    if isinstance(n_draws, bool) or not isinstance(n_draws, (int, np.integer)) or n_draws < 2:
        raise ValueError(f"expected n_draws >= 2 (variances need two draws), got {n_draws!r}")
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"expected k values >= 1, got {ks}")
    chosen = estimators(names if names is not None else default_estimators(objective))
    wrong = [e.name for e in chosen if objective not in e.objectives]
    if wrong:
        raise ValueError(f"estimators {wrong} do not estimate the gradient of the {objective} objective")
    pooled = [e.name for e in chosen if e.pools_draws]
    if pooled:
        raise ValueError(f"estimators {pooled} pool several draws of one image into each estimate; here every "
                         "draw is one estimate of the batch's gradient")
    unbiased = [e.name for e in chosen if e.is_unbiased(objective)]
    if signal == "best":
        if not unbiased:
            raise ValueError(f"signal 'best' needs an estimator unbiased for the {objective} gradient among "
                             f"{', '.join(e.name for e in chosen)}")
    elif signal is not None:
        if signal not in [e.name for e in chosen]:
            raise ValueError(f"signal {signal!r} is not among the estimators measured ({', '.join(e.name for e in chosen)})")
        if not ESTIMATORS[signal].is_unbiased(objective):
            raise ValueError(f"signal {signal!r} is biased for the {objective} gradient: its mean is not the gradient")
    x = model.check_input(x)
    batch, zdim = len(x), model.config.latent_dim
    groups = np.concatenate([np.full(g.size, _group(key) == "decoder") for key, g in model.gradients().items()])
    rows = []
    for k in ks:
        sums = {}  # estimator -> [first draw, sum of (g - first), sum of (g - first)^2], float64 (n_params,)
        ess = 0.0

        def add(name, g):
            g = g.astype(np.float64)
            if name not in sums:
                sums[name] = [g.copy(), np.zeros_like(g), np.zeros_like(g)]
            else:
                d = g - sums[name][0]
                sums[name][1] += d
                sums[name][2] += d * d

        for _ in range(n_draws):
            eps = rng.standard_normal((batch, k, zdim), dtype=model.dtype)
            draws = k_sample_draws(model, x, eps, objective, -1.0 / batch)[0]  # gradients of the bound, not the loss
            ess += float((1.0 / (draws.weights**2).sum(axis=1)).mean()) / n_draws
            decoder = model.params.grad[groups].copy()
            for e in chosen:
                model.posterior_forward(x)  # fresh encoder caches for each backward
                encoder_backward(model, x, (e.estimate(draws) / batch).astype(model.dtype))
                g = model.params.grad.copy()
                g[groups] = decoder
                add(e.name, g)
        stats = {}  # estimator -> (mean, variance) per parameter
        for e in chosen:
            first, s1, s2 = sums[e.name]
            stats[e.name] = (first + s1 / n_draws, np.maximum(s2 - s1 * s1 / n_draws, 0.0) / (n_draws - 1))
        if signal == "best":  # per parameter, the unbiased estimator whose draws vary least
            means, variances = (np.stack([stats[n][i] for n in unbiased]) for i in (0, 1))
            least = np.argmin(variances, axis=0)[None]
            stats["best"] = (np.take_along_axis(means, least, 0)[0], np.take_along_axis(variances, least, 0)[0])
        for e in chosen:
            mean, var = stats[e.name]
            source = signal if signal is not None and e.is_unbiased(objective) else e.name
            sig_mean, sig_var = stats[source]
            for group, mask in (("encoder", ~groups), ("decoder", groups)):
                m, v = mean[mask], var[mask]
                live = v > 0
                std = np.sqrt(v[live])
                snr = np.abs(sig_mean[mask][live]) / std
                floor = math.sqrt(2.0 / (math.pi * n_draws)) * np.sqrt(sig_var[mask][live]) / std
                rows.append({"estimator": e.name, "k": k, "group": group, "mean_abs": float(np.abs(m).mean()),
                             "var": float(v.mean()), "snr": float(snr.mean()) if live.any() else math.nan,
                             "median_snr": float(np.median(snr)) if live.any() else math.nan,
                             "params": int(live.sum()), "n_draws": int(n_draws), "objective": objective,
                             "signal": source, "floor": float(floor.mean()) if live.any() else math.nan,
                             "ess": ess})
    return rows


def snr_text(rows: list[dict]) -> str:
    """The rows of :func:`estimator_snr` as an aligned plain-text table."""
    if not rows:
        return ""
    r0 = rows[0]
    lines = [f"gradient of the {r0['objective']} bound, {r0['n_draws']} draws per estimator and k; per group, the "
             "mean over parameters of |mean|, variance and SNR = |signal| / std",
             "(signal: whose mean is the signal, the same gradient for every unbiased estimator (best: per parameter, "
             "the unbiased one varying least); floor: the SNR these draws show on average when the gradient is zero;",
             " ESS: effective sample size 1 / sum_j w_j^2 of the normalized weights, mean over draws)",
             f"{'estimator':<10} {'k':>5} {'ESS':>7}  {'group':<8} {'|mean|':>10} {'variance':>10} {'SNR':>8} "
             f"{'median SNR':>10} {'floor':>8}  signal"]
    for r in rows:
        lines.append(f"{r['estimator']:<10} {r['k']:>5} {r['ess']:>7.3g}  {r['group']:<8} {r['mean_abs']:>10.3g} "
                     f"{r['var']:>10.3g} {r['snr']:>8.3g} {r['median_snr']:>10.3g} {r['floor']:>8.2g}  {r['signal']}")
    return "\n".join(lines)
