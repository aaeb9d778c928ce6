"""Reconstruction losses of a decoder's output: one small object per likelihood, looked up by name.

Each is a pair of ops from :mod:`npvae.ops` with the buffers a training step reuses, plus the map from
the decoder's output to the mean of p(x | z) that pictures show. Rows are per example (sum over the
pixels); inputs are flat, (B, D).
"""

from __future__ import annotations

import numpy as np

from .. import ops


class Likelihood:
    """-log p(x | out) per example, from the decoder's output ``out`` (B, D)."""

    name = "likelihood"
    output_activation = "identity"  # the decoder's last activation that this loss expects
    is_density = True  # a log-density (a VAE's ELBO), not just an error to minimise

    def forward(self, out: np.ndarray, target: np.ndarray, buffer):
        """rows (B,), cache; ``buffer(name, shape)`` hands out the step's reusable arrays."""
        raise NotImplementedError

    def backward(self, drows: np.ndarray, cache, out: np.ndarray) -> np.ndarray:
        """dL/dout (B, D) written into ``out``, for upstream gradients ``drows`` (B,)."""
        raise NotImplementedError

    def mean(self, out: np.ndarray) -> np.ndarray:
        """The mean of p(x | z) given the decoder's output, as a new array."""
        return out.copy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Bernoulli(Likelihood):
    """Binary cross-entropy on logits (softplus form); the mean is sigmoid(logits)."""

    name = "bernoulli"

    def forward(self, out, target, buffer):
        b, d = out.shape
        return ops.bce_with_logits_forward(out, target, "none", probs=buffer("probs", (b, d)),
                                           rows=buffer("recon", (b,)), work=buffer("work", (b, d)))

    def backward(self, drows, cache, out):
        return ops.bce_with_logits_backward(drows, cache, out=out)

    def mean(self, out):
        return ops.activation_forward(out, "sigmoid")[0].copy()


class ContinuousBernoulli(Likelihood):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019) on logits, a density on [0, 1]."""

    name = "continuous_bernoulli"

    def forward(self, out, target, buffer):
        return ops.continuous_bernoulli_nll_forward(out, target, "none")

    def backward(self, drows, cache, out):
        return ops.continuous_bernoulli_nll_backward(drows, cache, out=out)

    def mean(self, out):
        return ops.continuous_bernoulli_mean(out)


class Gaussian(Likelihood):
    """Unit-variance Gaussian around a sigmoid mean in [0, 1]."""

    name = "gaussian"
    output_activation = "sigmoid"

    def forward(self, out, target, buffer):
        return ops.gaussian_nll_forward(out, target, "none", rows=buffer("recon", (out.shape[0],)))

    def backward(self, drows, cache, out):
        return ops.gaussian_nll_backward(drows, cache, out=out)


class SquaredError(Likelihood):
    """Squared error summed over pixels (an autoencoder's loss: an error, not a density)."""

    name = "mse"
    is_density = False

    def forward(self, out, target, buffer):
        return ops.mse_forward(out, target, "none", rows=buffer("recon", (out.shape[0],)))

    def backward(self, drows, cache, out):
        return ops.mse_backward(drows, cache, out=out)


LIKELIHOODS = {cls.name: cls for cls in (Bernoulli, Gaussian, ContinuousBernoulli)}


def likelihood(name: str) -> Likelihood:
    """The likelihood called ``name`` (one of :data:`LIKELIHOODS`, or ``"mse"``)."""
    if name == SquaredError.name:
        return SquaredError()
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}: expected one of {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[name]()
