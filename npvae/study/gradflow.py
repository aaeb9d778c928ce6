"""Gradient-flow study tools: where a VAE's gradient comes from, and how noisy its estimators are.

- :func:`decompose_gradients` splits every parameter's gradient of the batch-mean loss
  ``recon + beta * KL`` exactly into its reconstruction and KL parts (the model's backward with one
  upstream gradient set to zero), and :func:`decomposition_rows` summarises the split per parameter.
- :func:`compare_estimators` compares two unbiased estimators of the gradient of the expected
  reconstruction term with respect to the encoder's outputs: the reparameterization (pathwise)
  gradient and the score-function (REINFORCE) gradient, with and without a baseline.

Per-layer gradient norms over training come from the trainer (``--log-grad-norms``) and are drawn
by ``npvae plot CKPT grad-norms``.
"""

from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..models import GaussianLatent

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
                       batch_size: int | None = None) -> dict:
    """Reparameterization vs score-function estimates of the gradient of f = E_q[log p(x|z)].

    For each example, latent dimension j and parameter of q(z|x) = N(mu, exp(logvar)), one draw
    ``z = mu + std * eps`` gives

    ============================  ==========================================  ==========================================
    estimator                     d/dmu_j                                     d/dlogvar_j
    ============================  ==========================================  ==========================================
    reparameterization            df/dz_j                                     df/dz_j * eps_j * std_j / 2
    score function (REINFORCE)    f(z) * eps_j / std_j                        f(z) * (eps_j^2 - 1) / 2
    score function, baseline b    (f(z) - b) * eps_j / std_j                  (f(z) - b) * (eps_j^2 - 1) / 2
    ============================  ==========================================  ==========================================

    with f(z) = log p(x|z) (the positive log-likelihood, so the gradients point uphill). The
    score function's factors are d log q(z|x) / d(mu, logvar) at fixed z, from
    :func:`npvae.ops.gaussian_log_prob_backward`; the reparameterization gradient is the model's
    own backward pass. The baseline is the leave-one-out mean of f over the other draws of the
    same example, which keeps the estimator unbiased. All three estimate the same gradient.
    (For a VAE with ``logvar_bounds``, the reparameterization column is the gradient at the logvar
    head's output, so it is zero for a unit whose logvar sits outside the bounds.)

    Parameters
    ----------
    model : VAE or CVAE
    x : (N, D) array, a few examples (the table has 4 N Z rows)
    n_draws : int >= 2
        Independent draws of z per example.
    rng : np.random.Generator
    y : (N,) integer array, for a CVAE
    batch_size : int, optional
        Draws per forward pass (default 8192).

    Returns
    -------
    table : dict of columns, each a list with one entry per (example, parameter) row
        ``param`` (e.g. ``"x0 mu[1]"``), ``example``, ``dim``, ``wrt`` ("mu" or "logvar");
        for each of ``reparam``, ``score`` and ``baseline``: ``_mean``, ``_var`` (variance of one
        draw's estimate, ddof 1) and ``_se`` (standard error of the mean, sqrt(var / n_draws));
        plus scalars ``n_draws`` and ``objective`` (:data:`OBJECTIVE`). The layout is what
        :func:`npvae.viz.plots.plot_estimator_comparison` reads. Overwrites ``model.params.grad``.
    """
    _check_vae_family(model, "the estimator comparison")
    if isinstance(n_draws, bool) or not isinstance(n_draws, (int, np.integer)) or n_draws < 2:
        raise ValueError(f"expected n_draws >= 2 (variances need two draws), got {n_draws!r}")
    x = model.check_input(x)
    y = model.check_labels(y, len(x))
    rows = DEFAULT_ROWS if batch_size is None else int(batch_size)
    zdim = model.config.latent_dim
    names = ("reparam", "score", "baseline")
    table = {"param": [], "example": [], "dim": [], "wrt": []}
    table.update({f"{e}_{s}": [] for e in names for s in ("mean", "var", "se")})
    for i in range(len(x)):
        f = np.empty(n_draws)  # f(z) per draw
        reparam = np.empty((n_draws, 2 * zdim))  # [d/dmu, d/dlogvar] per draw
        score_factor = np.empty((n_draws, 2 * zdim))  # d log q / d[mu, logvar] at the drawn z
        for start in range(0, n_draws, rows):
            n = min(rows, n_draws - start)
            xs = np.repeat(x[i : i + 1], n, axis=0)
            eps = rng.standard_normal((n, zdim), dtype=model.dtype)
            ys = None if y is None else np.repeat(y[i : i + 1], n)
            recon, _ = model.forward(xs, ys, eps=eps)
            f[start : start + n] = -recon
            model.backward(np.full(n, -1.0, model.dtype), np.zeros(n, model.dtype))  # d f / d[mu, logvar]
            reparam[start : start + n] = np.concatenate(model.latent_grads(n), axis=1)
            mu, logvar = (np.repeat(a, n, axis=0) for a in model.encode(x[i : i + 1], None if y is None else y[i : i + 1]))
            mu, logvar = mu.astype(np.float64), logvar.astype(np.float64)
            z = mu + np.exp(0.5 * logvar) * eps  # (n, Z) in float64, so (z - mu) / std recovers eps
            _, q_cache = ops.gaussian_log_prob_forward(z, mu, logvar, "none")
            _, dmu, dlogvar = ops.gaussian_log_prob_backward(np.ones(n), q_cache)
            score_factor[start : start + n] = np.concatenate([dmu, dlogvar], axis=1)
        baseline = (f.sum() - f) / (n_draws - 1)  # leave-one-out: independent of the draw it centres
        estimates = {"reparam": reparam, "score": f[:, None] * score_factor,
                     "baseline": (f - baseline)[:, None] * score_factor}
        for col in range(2 * zdim):
            wrt, dim = ("mu", col) if col < zdim else ("logvar", col - zdim)
            table["param"].append(f"x{i} {wrt}[{dim}]")
            table["example"].append(i)
            table["dim"].append(dim)
            table["wrt"].append(wrt)
            for e in names:
                v = estimates[e][:, col]
                var = float(v.var(ddof=1))
                table[f"{e}_mean"].append(float(v.mean()))
                table[f"{e}_var"].append(var)
                table[f"{e}_se"].append(math.sqrt(var / n_draws))
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
    """The table of :func:`compare_estimators` as aligned plain text, with variance ratios."""
    width = max(len("parameter"), *(len(p) for p in table["param"]))
    head = (f"{'parameter':<{width}}  {'reparam':>10} {'± se':>9}  {'score':>10} {'± se':>9}  "
            f"{'baseline':>10} {'± se':>9}  {'var score/reparam':>17}  {'var baseline/reparam':>20}")
    lines = [f"gradient of {table['objective']} w.r.t. q's parameters, {table['n_draws']} draws per example", head]
    for r in range(len(table["param"])):
        rv = table["reparam_var"][r]
        ratio = lambda key: f"{table[key][r] / rv:.3g}" if rv > 0 else "inf"  # noqa: E731
        lines.append(
            f"{table['param'][r]:<{width}}  {table['reparam_mean'][r]:>10.4g} {table['reparam_se'][r]:>9.3g}  "
            f"{table['score_mean'][r]:>10.4g} {table['score_se'][r]:>9.3g}  "
            f"{table['baseline_mean'][r]:>10.4g} {table['baseline_se'][r]:>9.3g}  "
            f"{ratio('score_var'):>17}  {ratio('baseline_var'):>20}")
    return "\n".join(lines)
