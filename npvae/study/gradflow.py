"""Gradient-flow study tools: where a VAE's gradient comes from, and how noisy its estimators are.

- :func:`decompose_gradients` splits every parameter's gradient of the batch-mean loss
  ``recon + beta * KL`` exactly into its reconstruction and KL parts (the model's backward with one
  upstream gradient set to zero), and :func:`decomposition_rows` summarises the split per parameter.
- :func:`compare_estimators` runs every estimator of :mod:`npvae.study.estimators` (the
  reparameterization gradient, the score function with and without a baseline) on the same draws
  of the gradient of the expected reconstruction term with respect to the encoder's outputs.

Per-layer gradient norms over training come from the trainer (``--log-grad-norms``) and are drawn
by ``npvae plot CKPT grad-norms``.
"""

from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..models import GaussianLatent
from .estimators import Draws, estimators

OBJECTIVE = "E_q[log p(x|z)]"  # what compare_estimators differentiates (to be maximised)
DEFAULT_ROWS = 8192  # draws per forward pass in compare_estimators


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
    model : VAE or CVAE (beta is ``model.kl_weight``, as in training)
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
    kl_scale = np.full(batch, model.kl_weight / batch, model.dtype)
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
    :data:`npvae.study.estimators.ESTIMATORS` (reparameterization, score function, score function
    with a leave-one-out baseline; formulas there). f(z) = log p(x|z); the pathwise gradient is the
    model's own backward pass, the score function's factors d log q(z|x) / d(mu, logvar) at fixed z
    come from :func:`npvae.ops.gaussian_log_prob_backward`. All of them estimate the same gradient.
    (For a VAE with ``logvar_bounds``, the reparameterization column is the gradient at the logvar
    head's output, so it is zero for a unit whose logvar sits outside the bounds.)

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
        Which estimators (default all, in registry order).

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
    chosen = estimators(names)
    x = model.check_input(x)
    y = model.check_labels(y, len(x))
    rows = DEFAULT_ROWS if batch_size is None else int(batch_size)
    zdim = model.config.latent_dim
    table = {"param": [], "example": [], "dim": [], "wrt": []}
    table.update({f"{e.name}_{s}": [] for e in chosen for s in ("mean", "var", "se")})
    for i in range(len(x)):
        f = np.empty(n_draws)  # f(z) per draw
        pathwise = np.empty((n_draws, 2 * zdim))  # [d/dmu, d/dlogvar] per draw
        score = np.empty((n_draws, 2 * zdim))  # d log q / d[mu, logvar] at the drawn z
        for start in range(0, n_draws, rows):
            n = min(rows, n_draws - start)
            xs = np.repeat(x[i : i + 1], n, axis=0)
            eps = rng.standard_normal((n, zdim), dtype=model.dtype)
            ys = None if y is None else np.repeat(y[i : i + 1], n)
            recon, _ = model.forward(xs, ys, eps=eps)
            f[start : start + n] = -recon
            model.backward(np.full(n, -1.0, model.dtype), np.zeros(n, model.dtype))  # d f / d[mu, logvar]
            pathwise[start : start + n] = np.concatenate(model.latent_grads(n), axis=1)
            mu, logvar = (np.repeat(a, n, axis=0) for a in model.encode(x[i : i + 1], None if y is None else y[i : i + 1]))
            mu, logvar = mu.astype(np.float64), logvar.astype(np.float64)
            z = mu + np.exp(0.5 * logvar) * eps  # (n, Z) in float64, so (z - mu) / std recovers eps
            _, q_cache = ops.gaussian_log_prob_forward(z, mu, logvar, "none")
            _, dmu, dlogvar = ops.gaussian_log_prob_backward(np.ones(n), q_cache)
            score[start : start + n] = np.concatenate([dmu, dlogvar], axis=1)
        draws = Draws(f, pathwise, score)
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
