"""The conditional VAE (Sohn et al., 2015) with a learned class-conditional prior network p(z | y).

This is the one model file that knows about labels: everything else passes ``y`` through the model
interface and checks the :class:`~npvae.models.base.Conditional` capability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import ops
from ..layers import GaussianHeads, Sequential, mlp
from ..registry import option
from .base import Conditional, _check_count, generator_or_default
from .likelihoods import LIKELIHOODS
from .vae import GaussianVAE, _positive, _sizes


def _fill_conditioned(buf: np.ndarray, k: int, head, y: np.ndarray) -> np.ndarray:
    """Write the concatenation ``[head, onehot(y)]`` into ``buf`` (B, K + C) and return it.

    ``head`` (B, K) may be None when ``buf[:, :K]`` is filled elsewhere (the sampler writes z there).
    The one-hot block is a constant: its gradient is never needed, so the concatenation's backward
    is a slice of the input gradient.
    """
    if head is not None:
        buf[:, :k] = head
    onehot = buf[:, k:]  # (B, C)
    onehot[...] = 0
    np.put_along_axis(onehot, y[:, None], 1, axis=1)
    return buf


@dataclass
class CVAEConfig:
    input_dim: int = option(784, "D, values per example", cli=False)
    num_classes: int = option(10, "C, labels are integers in [0, C) (the data's)", cli=False)
    hidden: tuple[int, ...] | None = option(
        (400,), "encoder widths over [x, onehot(y)], e.g. --hidden 512 256; the decoder mirrors them", nargs="+")
    latent_dim: int = option(20, "latent size Z")
    activation: str = option("relu", f"hidden activation, in all three networks: {', '.join(ops.ACTIVATIONS)}")
    likelihood: str = option("bernoulli", "the decoder's p(x|z,y): bernoulli (BCE on logits), gaussian (unit "
                             "variance) or continuous_bernoulli", choices=tuple(LIKELIHOODS))
    beta: float = option(1.0, "KL weight (1 gives the conditional ELBO)")
    alpha: float = option(0.01, "LeakyReLU slope, when activation = leaky_relu", cli=False)
    # The flag turns the learned prior off: it sets the field to False.
    learned_prior: bool = option(True, "use N(0, I) instead of the learned prior p(z|y) = N(mu_p(y), diag "
                                 "exp(logvar_p(y))) of a prior network", flag="--fixed-prior", const=False)
    prior_hidden: tuple[int, ...] = option((64,), "prior-network widths over onehot(y); unused without a learned "
                                           "prior", cli=False)


class CVAE(GaussianVAE, Conditional):
    """Conditional VAE (Sohn et al., 2015) with a learned class-conditional prior.

    - encoder q(z | x, y) = N(mu, diag exp(logvar)), an MLP over ``[x, onehot(y)]``:
      ``D + C -> hidden -> (mu, logvar)``;
    - prior p(z | y) = N(mu_p, diag exp(logvar_p)), an MLP over ``onehot(y)``:
      ``C -> prior_hidden -> (mu_p, logvar_p)``; with ``learned_prior=False`` the fixed N(0, I);
    - decoder p(x | z, y), an MLP over ``[z, onehot(y)]``: ``Z + C -> reversed(hidden) -> D``,
      with the VAE's likelihoods.

    Loss per example (negative conditional ELBO, nats): ``recon + beta * KL(q(z|x,y) || p(z|y))``,
    one reparameterized sample ``z = mu + exp(logvar / 2) * eps``, analytic KL between the two
    diagonal Gaussians (:func:`npvae.ops.kl_gaussians_forward`); batch mean.

    Every method that takes images also takes their labels ``y``: an integer array (B,) with values
    in [0, C) (see :meth:`check_labels`).

    Parameters
    ----------
    input_dim, num_classes, hidden, latent_dim, activation, likelihood, beta, alpha, learned_prior, prior_hidden
        See :class:`CVAEConfig`.
    dtype : float32 (training) or float64 (gradient checks)
    seed : int
        Seed of the parameter initialisation (PyTorch's ``nn.Linear`` default init).
    encoder, decoder : Sequential, optional
        Your own stacks over ``[x, onehot(y)]`` (B, D + C) and ``[z, onehot(y)]`` (B, Z + C).
    input_shape : tuple of int, optional

    State-dict keys, in forward order: ``encoder.{i}``, ``mu``, ``logvar``, ``prior.{i}``,
    ``prior_mu``, ``prior_logvar`` (the last three only with a learned prior), ``decoder.{i}``
    (each ``.weight``/``.bias``). As in the VAE, each pair of heads is one (2Z, H) layer whose
    halves are exported as the two heads.
    """

    kind = "cvae"
    help = "conditional VAE: p(x | y) for class labels y, a learned prior p(z | y)"
    config_class = CVAEConfig
    objective = "negative conditional ELBO"

    def __init__(self, input_dim: int = 784, num_classes: int = 10, hidden=(400,), latent_dim: int = 20,
                 activation: str = "relu", likelihood: str = "bernoulli", beta: float = 1.0, alpha: float = 0.01,
                 learned_prior: bool = True, prior_hidden=(64,), dtype=np.float32, seed: int = 0, *,
                 encoder: Sequential | None = None, decoder: Sequential | None = None, input_shape=None):
        self._conditioning = (_positive(num_classes, "num_classes"), bool(learned_prior), _sizes(prior_hidden, "prior_hidden"))
        self.num_classes = self._conditioning[0]
        super().__init__(input_dim, hidden, latent_dim, activation, likelihood, beta, alpha, None, dtype, seed,
                         encoder=encoder, decoder=decoder, input_shape=input_shape)

    def _make_config(self, *args, custom):
        base = super()._make_config(*args, custom=custom)
        return CVAEConfig(base.input_dim, self._conditioning[0], base.hidden, base.latent_dim, base.activation,
                          base.likelihood, base.beta, base.alpha, self._conditioning[1], self._conditioning[2])

    @property
    def encoder_input_shape(self) -> tuple[int, ...]:
        return (self.input_dim + self.num_classes,)

    @property
    def decoder_input_dim(self) -> int:
        return self.config.latent_dim + self.num_classes

    def _parts(self, encoder, decoder) -> dict:
        c = self.config
        parts = super()._parts(encoder, decoder)
        self.prior_net = self.prior_heads = None
        if not c.learned_prior:
            return parts
        sizes = [c.num_classes, *c.prior_hidden]
        self.prior_net = mlp(sizes, c.activation, c.activation, c.alpha) if len(sizes) > 1 else Sequential()
        self.prior_heads = GaussianHeads(sizes[-1], c.latent_dim, names=("prior_mu", "prior_logvar"))
        # forward order: encoder, heads, prior network, prior heads, decoder
        return {"encoder": parts["encoder"], "heads": parts["heads"], "prior": self.prior_net,
                "prior_heads": self.prior_heads, "decoder": parts["decoder"]}

    @property
    def loss_name(self) -> str:
        return self.config.likelihood

    # -- checks

    def check_labels(self, y, batch: int | None = None, name: str = "y") -> np.ndarray:
        """``y`` as an integer array (B,) of class labels in [0, C), with B = ``batch`` when given.

        Raises
        ------
        ValueError
            For a missing y, any other shape, a non-integer dtype (integral floats included: cast them with
            ``y.astype(int)``) or a label out of range.
        """
        c = self.num_classes
        expected = f"expected {name} of shape ({'B' if batch is None else batch},) with integer class labels in [0, {c})"
        if y is None:
            raise ValueError(f"{type(self).__name__} is conditional: pass its labels {name}; {expected}")
        y = np.asarray(y)
        if y.ndim != 1 or y.shape[0] < 1 or (batch is not None and y.shape[0] != batch):
            raise ValueError(f"{expected}, got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            hint = f" (cast integral floats with {name}.astype(int))" if np.issubdtype(y.dtype, np.floating) else ""
            raise ValueError(f"{expected}, got dtype {y.dtype}{hint}")
        bad = np.flatnonzero((y < 0) | (y >= c))
        if bad.size:
            raise ValueError(f"{expected}, got {y[bad[0]]} at index {bad[0]}")
        return y

    # -- the pieces

    def _encoder_input(self, x: np.ndarray, y) -> np.ndarray:
        batch = x.shape[0]
        xy = self.workspace.get(batch, "xy", (batch, self.input_dim + self.num_classes))
        return _fill_conditioned(xy, self.input_dim, x.reshape(batch, -1), y)  # (B, D + C)

    def _code_buffer(self, batch: int, y) -> np.ndarray:
        zy = self.workspace.get(batch, "zy", (batch, self.decoder_input_dim))
        _fill_conditioned(zy, self.config.latent_dim, None, y)  # z is written by the sampler
        return zy[:, : self.config.latent_dim]

    def _decoder_input(self, z: np.ndarray, y) -> np.ndarray:
        batch = z.shape[0]
        zy = self.workspace.get(batch, "zy", (batch, self.decoder_input_dim))
        if np.may_share_memory(z, zy):  # the sampler wrote z into place: the one-hot block is filled
            return zy
        return _fill_conditioned(zy, self.config.latent_dim, z, y)  # (B, Z + C)

    def _prior_forward(self, onehot: np.ndarray):
        """onehot(y) (B, C) -> views mu_p (B, Z), logvar_p (B, Z) of the prior heads' buffer."""
        heads = self.prior_heads.forward(self.prior_net.forward(onehot))
        z = self.config.latent_dim
        return heads[:, :z], heads[:, z:]

    def prior(self, n: int, y=None):
        """Parameters of p(z | y): mu_p (n, Z) and logvar_p (n, Z) (copies; zeros for the fixed prior)."""
        y = self.check_labels(y, n)
        if not self.config.learned_prior:
            return super().prior(n)
        onehot = _fill_conditioned(np.empty((n, self.num_classes), self.dtype), 0, None, y)
        return self._batched(lambda rows, _: self._prior_forward(rows), onehot, None, batch_size=1000)

    def _kl_forward(self, mu, logvar, y):
        if not self.config.learned_prior:
            return super()._kl_forward(mu, logvar, y)
        batch = mu.shape[0]
        onehot = self.workspace.get(batch, "xy", (batch, self.input_dim + self.num_classes))[:, self.input_dim :]
        mu_p, logvar_p = self._prior_forward(onehot)  # the one-hot block posterior_forward filled
        rows = self.workspace.get(batch, "kl", (batch,))
        kl, self._kl_cache = ops.kl_gaussians_forward(mu, logvar, mu_p, logvar_p, "none", rows=rows)
        return kl

    def _kl_backward(self, dkl, dmu, dlogvar) -> None:
        if not self.config.learned_prior:
            return super()._kl_backward(dkl, dmu, dlogvar)
        batch, z = dkl.shape[0], self.config.latent_dim
        dprior = self.workspace.get(batch, "dprior", (batch, 2 * z))
        ops.kl_gaussians_backward(dkl, self._kl_cache, dmu, dlogvar, dprior[:, :z], dprior[:, z:], accumulate=True)
        dh = self.prior_heads.backward(dprior, need_dx=self.prior_net.has_params)
        if self.prior_net.has_params:
            self.prior_net.backward(dh, need_dx=False)

    # -- inference

    def prior_codes(self, n: int, rng: np.random.Generator, y=None) -> np.ndarray:
        """One draw of z ~ p(z | y) per label (n, Z)."""
        mu_p, logvar_p = self.prior(n, y)
        z, _ = ops.reparameterize_forward(mu_p, logvar_p, rng=rng)
        return z

    def sample_labels(self, n: int, y=None) -> np.ndarray:
        """Labels of n samples: ``y`` None cycles 0, 1, ..., C - 1, 0, ... (sample i has label
        ``i % C``); an int conditions every sample on that class; an array (n,) gives each its own."""
        c = self.num_classes
        if y is None:
            return np.arange(n) % c
        if np.ndim(y) == 0:
            if isinstance(y, bool) or not isinstance(y, (int, np.integer)) or not 0 <= y < c:
                raise ValueError(f"expected label an integer class in [0, {c}) or None, got {y!r}")
            return np.full(n, int(y))
        return self.check_labels(y, n)

    def sample(self, n: int, rng: np.random.Generator | None = None, y=None) -> np.ndarray:
        """Decode n draws from the prior p(z | y): (n, *input_shape) means of p(x | z, y) (labels
        as :meth:`sample_labels` reads ``y``; ``rng`` as in :meth:`Model.sample`)."""
        n = _check_count(n)
        if n < 1:
            raise ValueError(f"expected n >= 1 samples, got {n}")
        return super().sample(n, generator_or_default(rng), y)

    def class_grid(self, n_per_class: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """``n_per_class`` samples of every class, (C, n, *input_shape): row c holds draws conditioned
        on y = c (for :func:`npvae.viz.plots.plot_class_grid`)."""
        n, c = int(n_per_class), self.num_classes
        if n < 1:
            raise ValueError(f"expected n_per_class >= 1, got {n}")
        images = self.sample(c * n, generator_or_default(rng), np.repeat(np.arange(c), n))
        return images.reshape(c, n, *self.input_shape)
