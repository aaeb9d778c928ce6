"""Gradient estimators of f = E_q[log p(x|z)] with respect to q's parameters (mu, logvar), as a registry.

Every estimator is one function of the same draws of one example (:class:`Draws`); the table of
:func:`npvae.study.gradflow.compare_estimators`, its text and its picture all iterate
:data:`ESTIMATORS`. Adding an estimator is one function and one entry here.

For draw ``z = mu + std * eps`` and latent dimension j:

==============================  ==========================================  ==========================================
estimator                       d/dmu_j                                     d/dlogvar_j
==============================  ==========================================  ==========================================
reparameterization              df/dz_j                                     df/dz_j * eps_j * std_j / 2
score function (REINFORCE)      f(z) * eps_j / std_j                        f(z) * (eps_j^2 - 1) / 2
score function, baseline b      (f(z) - b) * eps_j / std_j                  (f(z) - b) * (eps_j^2 - 1) / 2
==============================  ==========================================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Draws:
    """What n draws of z for one example give every estimator (float64).

    f : (n,) array
        log p(x | z) per draw (the positive log-likelihood, so gradients point uphill).
    pathwise : (n, 2Z) array
        df/d[mu, logvar] through the sampler: the model's own backward pass per draw.
    score : (n, 2Z) array
        d log q(z | x) / d[mu, logvar] at the drawn z (:func:`npvae.ops.gaussian_log_prob_backward`).
    """

    f: np.ndarray
    pathwise: np.ndarray
    score: np.ndarray


@dataclass(frozen=True)
class Estimator:
    name: str  # the table's column prefix, e.g. "reparam"
    label: str  # how pictures and text name it
    estimate: Callable[[Draws], np.ndarray]  # Draws -> (n, 2Z) one estimate per draw, all unbiased


def reparameterization(d: Draws) -> np.ndarray:
    """The pathwise gradient: differentiate f through z = mu + std * eps."""
    return d.pathwise


def score_function(d: Draws) -> np.ndarray:
    """REINFORCE: f(z) d log q(z|x) / d theta, with no derivative of f."""
    return d.f[:, None] * d.score


def score_function_loo(d: Draws) -> np.ndarray:
    """REINFORCE centred on the leave-one-out mean of f over the other draws (still unbiased: the
    baseline of a draw does not depend on it)."""
    n = len(d.f)
    baseline = (d.f.sum() - d.f) / (n - 1)
    return (d.f - baseline)[:, None] * d.score


ESTIMATORS = {e.name: e for e in (
    Estimator("reparam", "reparameterization", reparameterization),
    Estimator("score", "score function", score_function),
    Estimator("baseline", "score function, leave-one-out baseline", score_function_loo),
)}


def estimators(names=None) -> list[Estimator]:
    """The registered estimators called ``names`` (default: all, in registry order)."""
    if names is None:
        return list(ESTIMATORS.values())
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown or not names:
        raise ValueError(f"unknown estimators {unknown or names}: expected some of {', '.join(ESTIMATORS)}")
    return [ESTIMATORS[n] for n in names]
