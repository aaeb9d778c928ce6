"""The Gaussian VAE: an encoder and a decoder :class:`~npvae.layers.Sequential`, Gaussian heads between.

Loss per example (negative ELBO, nats): ``recon + beta * KL`` with ``recon = -log p(x | z)``,
``z = mu + exp(logvar / 2) * eps`` (one sample, :func:`npvae.ops.reparameterize_forward`) and the
analytic KL to the prior. The pieces of that path are public (``posterior_forward``,
``nll_forward``, their backwards and ``latent_grads``) so that the study tools can re-route it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import ops
from ..registry import option
from ..layers import Flatten, GaussianHeads, Reshape, Sequential, mlp
from .base import GaussianLatent, LossNames, Model, StandardNormalPrior
from .likelihoods import LIKELIHOODS, likelihood as make_likelihood


@dataclass
class VAEConfig:
    input_dim: int = option(784, "D, values per example", cli=False)
    hidden: tuple[int, ...] | None = option(
        (400,), "encoder widths, e.g. --hidden 512 256; the decoder mirrors them", nargs="+")
    latent_dim: int = option(20, "latent size Z")
    activation: str = option("relu", f"hidden activation: {', '.join(ops.ACTIVATIONS)}")
    likelihood: str = option("bernoulli", "the decoder's p(x|z): bernoulli (BCE on logits), gaussian (unit variance) "
                             "or continuous_bernoulli", choices=tuple(LIKELIHOODS))
    beta: float = option(1.0, "KL weight (beta-VAE; 1 gives the ELBO)")
    alpha: float = option(0.01, "LeakyReLU slope, when activation = leaky_relu", cli=False)
    logvar_bounds: tuple[float, float] | None = option(
        None, "clamp the encoder's logvar into [LO, HI] (its gradient is 0 outside)", nargs=2, metavar=("LO", "HI"))


def _sizes(values, name: str) -> tuple[int, ...]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"expected {name} positive integers, got {tuple(values)}")
        out.append(int(v))
    return tuple(out)


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"expected {name} a positive integer, got {value!r}")
    return int(value)


def input_layers(input_shape) -> list:
    """A Flatten for images (B, H, W, ...), nothing for flat inputs (B, D)."""
    return [Flatten()] if len(input_shape) > 1 else []


def output_layers(input_shape) -> list:
    """A Reshape back to the images' shape, nothing for flat outputs."""
    return [Reshape(input_shape)] if len(input_shape) > 1 else []


def resolve_input_shape(input_dim, input_shape) -> tuple[int, ...]:
    if input_shape is None:
        return (_positive(input_dim, "input_dim"),)
    shape = tuple(_positive(s, "input_shape") for s in (input_shape if not isinstance(input_shape, int) else (input_shape,)))
    if not shape:
        raise ValueError("expected input_shape with at least one dimension")
    return shape


def check_stack(stack, in_shape, out_shape, what: str) -> None:
    """Raise one line when ``stack`` does not map ``in_shape`` to ``out_shape`` (per example)."""
    if not isinstance(stack, Sequential):
        raise TypeError(f"expected the {what} as an npvae.layers.Sequential, got {type(stack).__name__}")
    got = stack.output_shape(tuple(in_shape))
    if out_shape is not None and tuple(got) != tuple(out_shape):
        raise ValueError(f"the {what} maps inputs of shape (B, {', '.join(map(str, in_shape))}) to "
                         f"(B, {', '.join(map(str, got))}), expected (B, {', '.join(map(str, out_shape))})")


class GaussianVAE(Model, GaussianLatent):
    prior_name = "the prior"
    """What every Gaussian VAE shares: encoder stack, Gaussian heads, sampler, decoder stack, KL.

    :class:`VAE` adds the prior N(0, I); :class:`~npvae.models.cvae.CVAE` a learned p(z | y).
    """

    kind = "vae"
    config_class = VAEConfig
    needs_noise = True
    objective = "negative ELBO"  # what recon + KL is, at beta = 1
    logvar_scale = 1.0  # logvar = logvar_scale * (the head's output): 2 when the head emits log sigma

    def __init__(self, input_dim: int = 784, hidden=(400,), latent_dim: int = 20, activation: str = "relu",
                 likelihood: str = "bernoulli", beta: float = 1.0, alpha: float = 0.01,
                 logvar_bounds: tuple[float, float] | None = None, dtype=np.float32, seed: int = 0, *,
                 encoder: Sequential | None = None, decoder: Sequential | None = None, input_shape=None):
        self.input_shape = resolve_input_shape(input_dim, input_shape)
        self.config = self._make_config(hidden, latent_dim, activation, likelihood, beta, alpha, logvar_bounds,
                                        custom=encoder is not None or decoder is not None)
        self._validate_config()
        self.reg_weight = self.config.beta  # the trainer anneals this during KL warm-up
        encoder, decoder = self._stacks(encoder, decoder)
        self._build(self._parts(encoder, decoder), dtype, seed)

    # -- construction

    def _make_config(self, hidden, latent_dim, activation, likelihood, beta, alpha, logvar_bounds, custom):
        bounds = None if logvar_bounds is None else (float(logvar_bounds[0]), float(logvar_bounds[1]))
        return VAEConfig(self.input_dim, None if custom else _sizes(hidden, "hidden"), _positive(latent_dim, "latent_dim"),
                         activation, likelihood, float(beta), float(alpha), bounds)

    def _validate_config(self) -> None:
        c = self.config
        ops.ACTIVATIONS.check(c.activation)
        if c.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {c.likelihood!r}: expected one of {', '.join(LIKELIHOODS)}")
        if not c.beta >= 0:
            raise ValueError(f"expected beta >= 0, got {c.beta}")
        bounds = getattr(c, "logvar_bounds", None)
        if bounds is not None and not (len(bounds) == 2 and bounds[0] < bounds[1]):
            raise ValueError(f"expected logvar_bounds (lo, hi) with lo < hi, got {bounds}")
        self.likelihood = make_likelihood(c.likelihood)
        self._logvar_bounds = bounds

    @property
    def encoder_input_shape(self) -> tuple[int, ...]:
        return self.input_shape

    @property
    def decoder_input_dim(self) -> int:
        return self.config.latent_dim

    def _stacks(self, encoder, decoder):
        """The encoder and decoder stacks: the given ones (checked) or the MLPs of ``hidden``."""
        c = self.config
        if (encoder is None) != (decoder is None):
            raise ValueError("pass both encoder and decoder (or neither, to build them from hidden)")
        if encoder is None:
            enc_in = int(np.prod(self.encoder_input_shape))
            encoder = Sequential(input_layers(self.encoder_input_shape)
                                 + (list(mlp([enc_in, *c.hidden], c.activation, c.activation, c.alpha)) if c.hidden else []))
            decoder = Sequential(list(mlp([self.decoder_input_dim, *reversed(c.hidden), self.input_dim], c.activation,
                                          self.likelihood.output_activation, c.alpha)) + output_layers(self.input_shape))
        check_stack(encoder, self.encoder_input_shape, None, "encoder")
        features = encoder.output_shape(self.encoder_input_shape)
        if len(features) != 1:
            raise ValueError(f"the encoder must end in flat features (B, H), got (B, {', '.join(map(str, features))}); "
                             "end it with Flatten()")
        check_stack(decoder, (self.decoder_input_dim,), self.input_shape, "decoder")
        self._features = features[0]
        return encoder, decoder

    def _parts(self, encoder, decoder) -> dict:
        self.encoder, self.decoder = encoder, decoder
        self.heads = GaussianHeads(self._features, self.config.latent_dim)
        return {"encoder": encoder, "heads": self.heads, "decoder": decoder}

    @property
    def loss_name(self) -> str:
        return self.config.likelihood

    @property
    def eval_weight(self) -> float:
        return self.config.beta

    @property
    def loss_names(self) -> LossNames:
        """``negative ELBO`` in nats (a likelihood's negative log-density); ``recon + beta KL`` for beta != 1."""
        beta = self.config.beta
        total = self.objective if beta == 1 else f"recon + {beta:g} KL"
        return LossNames(total, "recon", "KL", "nats" if self.likelihood.is_density else None)

    # -- the pieces of the reparameterization path

    def _encoder_input(self, x: np.ndarray, y) -> np.ndarray:
        return x

    def _decoder_input(self, z: np.ndarray, y) -> np.ndarray:
        """What the decoder reads for codes z (B, Z): z itself here; [z, onehot(y)] in a CVAE."""
        return z

    def _code_buffer(self, batch: int, y) -> np.ndarray:
        """Where the sampler writes z (B, Z): a view of the decoder's input where one is built."""
        return self.workspace.get(batch, "z", (batch, self.config.latent_dim))

    def posterior_forward(self, x: np.ndarray, y=None):
        """x (B, *input_shape) -> views mu (B, Z), logvar (B, Z) of the heads' buffer (clamped when
        ``logvar_bounds`` is set); caches what :meth:`posterior_backward` needs. Inputs unchecked."""
        heads = self.heads.forward(self.encoder.forward(self._encoder_input(x, y)))
        z = self.config.latent_dim
        mu, logvar = heads[:, :z], heads[:, z:]
        if self.logvar_scale != 1.0:
            logvar *= self.logvar_scale
        bounds = self._logvar_bounds
        if bounds is not None:
            mask = self.workspace.get(x.shape[0], "logvar_mask", logvar.shape, bool)
            logvar, self._clamp_cache = ops.clamp_forward(logvar, *bounds, out=logvar, mask=mask)
        return mu, logvar

    def latent_grads(self, batch: int):
        """Views dmu (B, Z), dlogvar (B, Z) of the buffer :meth:`posterior_backward` reads; after
        :meth:`backward` they hold dL/dmu and dL/dlogvar (at the heads' output)."""
        dheads = self.workspace.get(batch, "dheads", (batch, 2 * self.config.latent_dim))
        z = self.config.latent_dim
        return dheads[:, :z], dheads[:, z:]

    def posterior_backward(self, dmu: np.ndarray, dlogvar: np.ndarray) -> None:
        """Gradients of the encoder and heads for upstream dmu, dlogvar (B, Z), into ``params.grad``."""
        batch, z = dmu.shape[0], self.config.latent_dim
        dheads = self.workspace.get(batch, "dheads", (batch, 2 * z))
        if not np.may_share_memory(dmu, dheads):
            dheads[:, :z] = dmu
        if not np.may_share_memory(dlogvar, dheads):
            dheads[:, z:] = dlogvar
        if self._logvar_bounds is not None:
            ops.clamp_backward(dheads[:, z:], self._clamp_cache, out=dheads[:, z:])
        if self.logvar_scale != 1.0:
            dheads[:, z:] *= self.logvar_scale
        dh = self.heads.backward(dheads, need_dx=self.encoder.has_params)
        if self.encoder.has_params:
            self.encoder.backward(dh, need_dx=False)

    def nll_forward(self, z: np.ndarray, x: np.ndarray, y=None) -> np.ndarray:
        """-log p(x | z[, y]) per example (B,) for codes z (B, Z); caches for :meth:`nll_backward`."""
        out = self.decoder.forward(self._decoder_input(z, y))  # (B, *input_shape)
        batch = out.shape[0]
        rows, self._nll_cache = self.likelihood.forward(
            out.reshape(batch, -1), x.reshape(batch, -1), lambda name, shape: self.workspace.get(batch, name, shape))
        return rows

    def nll_backward(self, drows: np.ndarray) -> np.ndarray:
        """dL/dz (B, Z) for upstream gradients ``drows`` (B,) of :meth:`nll_forward`'s rows; fills the
        decoder's gradients."""
        dzin = self._decoder_backward(self.likelihood, drows, self._nll_cache)
        return dzin[:, : self.config.latent_dim]

    def prior(self, n: int, y=None):
        """Parameters of p(z): mu_p (n, Z) and logvar_p (n, Z), zeros for N(0, I)."""
        return np.zeros((n, self.config.latent_dim), self.dtype), np.zeros((n, self.config.latent_dim), self.dtype)

    def _kl_forward(self, mu, logvar, y):
        rows = self.workspace.get(mu.shape[0], "kl", (mu.shape[0],))
        kl, self._kl_cache = ops.kl_normal_forward(mu, logvar, "none", rows=rows)
        return kl

    def _kl_backward(self, dkl, dmu, dlogvar) -> None:
        ops.kl_normal_backward(dkl, self._kl_cache, dmu, dlogvar, accumulate=True)

    # -- the loss

    def forward(self, x, y=None, eps=None, rng=None, target=None):
        """One-sample negative ELBO terms per example, caching what :meth:`backward` needs. Inputs unchecked.

        Parameters
        ----------
        x : (B, *input_shape) array
        y : labels, for conditional models
        eps : (B, Z) array, optional (drawn from ``rng`` when not given)
        target : (B, *input_shape) array, optional (default: x)

        Returns
        -------
        recon : (B,) array, -log p(target | z) per example
        kl : (B,) array, KL(q(z|x) || p(z)) per example
        """
        batch = x.shape[0]
        mu, logvar = self.posterior_forward(x, y)
        eps = self._draw_eps(batch, eps, rng)
        std = self.workspace.get(batch, "std", mu.shape)
        z, self._sampler_cache = ops.reparameterize_forward(mu, logvar, eps, out=self._code_buffer(batch, y), std=std)
        recon = self.nll_forward(z, x if target is None else target, y)
        return recon, self._kl_forward(mu, logvar, y)

    def backward(self, drecon: np.ndarray, dreg: np.ndarray) -> None:
        """Fill ``params.grad`` with d/dtheta of sum_i drecon[i] recon_i + dreg[i] kl_i (the regulariser
        of a VAE is its KL, as :meth:`Model.backward`'s ``dreg`` for every model).

        Either part may be zero, which splits a gradient exactly into its reconstruction and KL parts.

        Parameters
        ----------
        drecon, dreg : (B,) arrays
        """
        dz = self.nll_backward(drecon)
        dmu, dlogvar = self.latent_grads(len(drecon))
        ops.reparameterize_backward(dz, self._sampler_cache, dmu, dlogvar)
        self._kl_backward(dreg, dmu, dlogvar)
        self.posterior_backward(dmu, dlogvar)

    # -- inference

    def encode(self, x, y=None, batch_size: int = 1000):
        """Posterior parameters: mu (N, Z) and logvar (N, Z) (copies)."""
        x = self.check_input(x)
        y = self.check_labels(y, len(x))
        return self._batched(self.posterior_forward, x, y, batch_size=batch_size)

    def codes(self, x, y=None, batch_size: int = 1000) -> np.ndarray:
        """The posterior means mu (N, Z)."""
        return self.encode(x, y, batch_size)[0]

    def decode(self, z, y=None, batch_size: int = 1000) -> np.ndarray:
        """Mean of p(x | z[, y]) for codes z (N, Z) -> (N, *input_shape)."""
        z = self.check_codes(z)
        y = self.check_labels(y, len(z))

        def mean(zb, yb):
            out = self.decoder.forward(self._decoder_input(zb, yb))
            return self.likelihood.mean(out.reshape(len(zb), -1)).reshape(out.shape)

        return self._batched(mean, z, y, batch_size=batch_size)


class VAE(GaussianVAE, StandardNormalPrior):
    """Gaussian VAE: q(z|x) = N(mu(x), diag exp(logvar(x))), p(z) = N(0, I), decoder p(x|z).

    Built from ``hidden``: encoder MLP ``D -> hidden``, heads ``-> (mu, logvar)``, decoder MLP
    ``Z -> reversed(hidden) -> D``; the default is the classic 784-400-20-400-784 ReLU model with a
    Bernoulli decoder. Or from your own layers: ``encoder`` maps x (B, *input_shape) to features
    (B, H), ``decoder`` maps z (B, Z) to the likelihood's parameters (B, *input_shape)::

        VAE(encoder=Sequential(Flatten(), Dense(400, 128, "relu")),
            decoder=Sequential(Dense(8, 128, "relu"), Dense(128, 400), Reshape((20, 20))),
            latent_dim=8, input_shape=(20, 20))

    Parameters
    ----------
    input_dim, hidden, latent_dim, activation, likelihood, beta, alpha, logvar_bounds
        See :class:`VAEConfig`.
    dtype : float32 (training) or float64 (gradient checks)
    seed : int
        Seed of the parameter initialisation (PyTorch's ``nn.Linear`` default init).
    encoder, decoder : Sequential, optional
        Your own stacks (both or neither); ``hidden`` and ``activation`` are then unused.
    input_shape : tuple of int, optional
        The shape of one example, e.g. (20, 20); default ``(input_dim,)``.

    State-dict keys: ``encoder.{i}``, ``mu``, ``logvar``, ``decoder.{i}`` (each ``.weight``/``.bias``).
    The mu and logvar heads are one (2Z, H) layer whose halves are exported as the two heads.
    """

    help = "Gaussian VAE: MLP encoder and decoder, prior N(0, I)"
