"""The model family: autoencoder, denoising autoencoder, poor man's VAE, Gaussian VAE and conditional VAE.

Each model is a thin shell over :mod:`npvae.ops` and :mod:`npvae.layers`: it wires layers together
and calls the ops' forward and backward functions in order; no math is re-derived here.

Every model offers the same surface:

- ``loss_and_grads(x, eps=None, rng=None) -> (LossTerms, grads)``: batch-mean loss (nats per
  example for the likelihood models), its reconstruction and regulariser parts, and gradients keyed
  like :meth:`Model.state_dict`.
- ``state_dict()`` / ``load_state_dict(d)``: NumPy arrays in PyTorch ``nn.Linear`` layout (weight
  ``(out, in)``, bias ``(out,)``), keys in forward order.
- ``encode``, ``decode``, ``reconstruct``, ``sample`` for pictures and evaluation.

All parameters live in one flat buffer ``model.params.data`` and their gradients in
``model.params.grad`` (see :class:`npvae.layers.Parameters`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import ops
from .layers import MLP, Dense, Parameters, check_dtype

LIKELIHOODS = ("bernoulli", "gaussian", "continuous_bernoulli")


@dataclass(frozen=True)
class LossTerms:
    """Batch means, per example: ``total = recon + weight * kl`` (weight = beta for VAEs)."""

    total: float  # the training objective (negative ELBO for VAEs), per example
    recon: float  # reconstruction term: negative log-likelihood (or squared error), per example
    kl: float  # KL(q(z|x) || p(z)) for VAEs; the poor man's VAE puts its ||z|| penalty here; 0 for AEs


# ----------------------------------------------------------------------------- likelihoods


def _nll(likelihood: str):
    """(forward, backward) ops of the reconstruction negative log-likelihood."""
    if likelihood == "bernoulli":
        return ops.bce_with_logits_forward, ops.bce_with_logits_backward
    if likelihood == "continuous_bernoulli":
        return ops.continuous_bernoulli_nll_forward, ops.continuous_bernoulli_nll_backward
    if likelihood == "gaussian":
        return ops.gaussian_nll_forward, ops.gaussian_nll_backward
    if likelihood == "mse":
        return ops.mse_forward, ops.mse_backward
    raise ValueError(f"unknown likelihood {likelihood!r}: expected one of {', '.join(LIKELIHOODS)}")


def _decoder_output_activation(likelihood: str) -> str:
    """Bernoulli-type decoders emit logits; a Gaussian decoder emits its mean in [0, 1]."""
    return "sigmoid" if likelihood == "gaussian" else "identity"


def _decoder_mean(likelihood: str, out: np.ndarray) -> np.ndarray:
    """The decoder's output turned into the mean of p(x | z), as a new array."""
    if likelihood == "bernoulli":
        return ops.activation_forward(out, "sigmoid")[0].copy()
    if likelihood == "continuous_bernoulli":
        return ops.continuous_bernoulli_mean(out)
    return out.copy()


# ----------------------------------------------------------------------------- base


class Model:
    """Shared machinery: parameter storage, state dicts, input checks, batched inference.

    Subclasses set ``self.config`` and ``self.layers`` (an ordered dict of name -> Dense, in
    forward order) and call :meth:`_allocate`.
    """

    kind = "model"
    value_range = (0.0, 1.0)
    conditional = False  # True for models of p(x | y): the training loop then passes labels y

    # -- construction

    def _allocate(self, dtype, seed: int) -> None:
        self.dtype = check_dtype(dtype)
        shapes = {}
        for name, layer in self.layers.items():
            for pname, shape in layer.param_shapes().items():
                shapes[f"{name}.{pname}"] = shape
        self.params = Parameters(shapes, self.dtype)
        rng = np.random.default_rng(seed)
        for name, layer in self.layers.items():
            p = self.params
            layer.bind(p.value(f"{name}.weight"), p.value(f"{name}.bias"), p.gradient(f"{name}.weight"), p.gradient(f"{name}.bias"))
            layer.init(rng)
        self._scales: dict[tuple[int, float], np.ndarray] = {}

    def _exported(self):
        """(key, value view, gradient view) in forward order; the keys of :meth:`state_dict`."""
        for name, layer in self.layers.items():
            yield f"{name}.weight", layer.weight, layer.dweight
            yield f"{name}.bias", layer.bias, layer.dbias

    # -- parameters

    def parameters(self) -> dict[str, np.ndarray]:
        """Parameter views (writes change the model), keyed like :meth:`state_dict`."""
        return {key: value for key, value, _ in self._exported()}

    def gradients(self) -> dict[str, np.ndarray]:
        """Views of the gradients written by the last :meth:`loss_and_grads`."""
        return {key: grad for key, _, grad in self._exported()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters in PyTorch ``nn.Linear`` layout, keys in forward order."""
        return {key: value.copy() for key, value, _ in self._exported()}

    def load_state_dict(self, state: dict) -> None:
        """Copy ``state`` into the model; every key must be present with the right shape."""
        expected = {key: value.shape for key, value, _ in self._exported()}
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong = [
            f"{k}: expected {expected[k]}, got {np.shape(state[k])}"
            for k in expected
            if k in state and np.shape(state[k]) != expected[k]
        ]
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append("missing keys " + ", ".join(missing))
            if unexpected:
                parts.append("unexpected keys " + ", ".join(unexpected))
            parts.extend(wrong)
            raise ValueError(f"state dict does not fit {self!r}: " + "; ".join(parts))
        arrays = {key: np.asarray(state[key]) for key in expected}
        for key, array in arrays.items():  # check everything before changing anything
            if not np.issubdtype(array.dtype, np.floating):
                raise TypeError(f"{key}: expected a float array, got dtype {array.dtype}")
            if not np.isfinite(array).all():
                raise ValueError(f"{key}: contains NaN or Inf")
        for key, value, _ in self._exported():
            value[...] = arrays[key]

    @property
    def num_parameters(self) -> int:
        return self.params.size

    # -- checks

    def check_input(self, x, name: str = "x") -> np.ndarray:
        """``x`` as a (B, D) array of the model's dtype, finite and in the model's value range."""
        x = np.asarray(x)
        d = self.config.input_dim
        if x.ndim != 2 or x.shape[1] != d or x.shape[0] < 1:
            hint = " (flatten images with x.reshape(len(x), -1))" if x.ndim == 3 else ""
            raise ValueError(f"expected {name} of shape (B, {d}) with B >= 1, got {x.shape}{hint}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
            raise TypeError(f"expected {name} with a numeric dtype, got {x.dtype}")
        x = np.asarray(x, dtype=self.dtype)
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0]
            raise ValueError(f"{name} contains NaN or Inf (first at index {tuple(int(i) for i in bad)})")
        lo, hi = self.value_range
        if x.min() < lo or x.max() > hi:
            raise ValueError(
                f"expected {name} values in [{lo:g}, {hi:g}] for {self.kind} with "
                f"{getattr(self.config, 'likelihood', 'this loss')}, got range [{x.min():g}, {x.max():g}]"
            )
        return x

    def _check_noise(self, x: np.ndarray, eps, rng):
        """``eps`` as a (B, Z) array of the model's dtype (or None); without eps, rng must be a Generator."""
        if eps is not None:
            shape = (x.shape[0], self.config.latent_dim)
            eps = np.asarray(eps)
            if eps.shape != shape:
                raise ValueError(f"expected eps of shape {shape}, got {eps.shape}")
            eps = eps.astype(self.dtype, copy=False)
            if not np.isfinite(eps).all():
                raise ValueError("eps contains NaN or Inf")
            return eps
        if rng is None:
            raise ValueError("pass eps (B, Z) or rng (an np.random.Generator) to draw it")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"expected rng to be an np.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
        return None

    def _row_scale(self, batch: int, weight: float) -> np.ndarray:
        """The constant (B,) vector weight / B, cached per (batch, weight): the batch mean's gradient."""
        key = (batch, float(weight))
        scale = self._scales.get(key)
        if scale is None:
            if len(self._scales) > 16:
                self._scales.clear()
            scale = self._scales[key] = np.full(batch, weight / batch, dtype=self.dtype)
        return scale

    def _batched(self, fn, x: np.ndarray, batch_size: int):
        """Apply ``fn`` to slices of x and stack the (copied) results (an empty x gives an empty result)."""
        starts = range(0, len(x), batch_size) if len(x) else [0]
        return np.concatenate([np.array(fn(x[i : i + batch_size])) for i in starts])

    @staticmethod
    def _check_rng(rng) -> np.random.Generator:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"expected rng to be an np.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
        return rng

    def _check_count(self, n) -> int:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"expected n, the number of samples, as an integer >= 0, got {n!r}")
        return int(n)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"{type(self).__name__}({fields}, dtype={self.dtype.name}, parameters={self.num_parameters:,})"


# ----------------------------------------------------------------------------- Gaussian VAE


@dataclass
class VAEConfig:
    input_dim: int = 784  # D, pixels per image
    hidden: tuple[int, ...] = (400,)  # encoder widths; the decoder mirrors them
    latent_dim: int = 20  # Z
    activation: str = "relu"  # hidden-layer activation
    likelihood: str = "bernoulli"  # p(x|z): bernoulli (BCE on logits), gaussian (unit variance), continuous_bernoulli
    beta: float = 1.0  # KL weight (beta-VAE); beta = 1 gives the ELBO
    alpha: float = 0.01  # LeakyReLU slope, when activation = leaky_relu
    logvar_bounds: tuple[float, float] | None = None  # clamp logvar into [lo, hi] (gradient 0 outside)


class VAE(Model):
    """Gaussian VAE: q(z|x) = N(mu(x), diag exp(logvar(x))), p(z) = N(0, I), decoder p(x|z).

    Encoder MLP ``D -> hidden -> (mu, logvar)``, decoder MLP ``Z -> reversed(hidden) -> D``.
    The default is the classic 784-400-20-400-784 ReLU model with a Bernoulli decoder.

    Loss per example (negative ELBO, nats): ``recon + beta * KL`` with
    ``recon = -log p(x | z)``, ``z = mu + exp(logvar / 2) * eps`` (one sample), analytic KL.

    Parameters
    ----------
    input_dim, hidden, latent_dim, activation, likelihood, beta, alpha
        See :class:`VAEConfig`.
    dtype : float32 (training) or float64 (gradient checks)
    seed : int
        Seed of the parameter initialisation (PyTorch's ``nn.Linear`` default init).

    State-dict keys: ``encoder.{i}``, ``mu``, ``logvar``, ``decoder.{i}``, ``output`` (each
    ``.weight``/``.bias``). Internally the mu and logvar heads are one (2Z, H) layer whose halves
    are exported as the two heads.
    """

    kind = "vae"

    def __init__(
        self,
        input_dim: int = 784,
        hidden=(400,),
        latent_dim: int = 20,
        activation: str = "relu",
        likelihood: str = "bernoulli",
        beta: float = 1.0,
        alpha: float = 0.01,
        logvar_bounds: tuple[float, float] | None = None,
        dtype=np.float32,
        seed: int = 0,
    ):
        bounds = None if logvar_bounds is None else (float(logvar_bounds[0]), float(logvar_bounds[1]))
        self.config = VAEConfig(int(input_dim), tuple(int(h) for h in hidden), int(latent_dim), activation, likelihood,
                                float(beta), float(alpha), bounds)
        self._validate_config()
        self.kl_weight = self.config.beta  # the trainer anneals this during KL warm-up
        self._build_layers()
        self._allocate(dtype, seed)
        self._dheads: dict[int, np.ndarray] = {}
        self._bufs: dict[int, dict[str, np.ndarray]] = {}

    def _validate_config(self) -> None:
        c = self.config
        if c.input_dim < 1 or c.latent_dim < 1 or any(h < 1 for h in c.hidden):
            raise ValueError(f"expected positive sizes, got input_dim={c.input_dim}, hidden={c.hidden}, latent_dim={c.latent_dim}")
        if c.activation not in ops.ACTIVATIONS:
            raise ValueError(f"unknown activation {c.activation!r}: expected one of {', '.join(ops.ACTIVATIONS)}")
        if c.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {c.likelihood!r}: expected one of {', '.join(LIKELIHOODS)}")
        if not c.beta >= 0:
            raise ValueError(f"expected beta >= 0, got {c.beta}")
        bounds = getattr(c, "logvar_bounds", None)
        if bounds is not None and not (len(bounds) == 2 and bounds[0] < bounds[1]):
            raise ValueError(f"expected logvar_bounds (lo, hi) with lo < hi, got {bounds}")
        self._nll_forward, self._nll_backward = _nll(c.likelihood)

    def _encoder_sizes(self):
        return [self.config.input_dim, *self.config.hidden]

    def _decoder_sizes(self):
        return [self.config.latent_dim, *reversed(self.config.hidden), self.config.input_dim]

    def _build_layers(self) -> None:
        c = self.config
        enc = self._encoder_sizes()
        dec = self._decoder_sizes()
        self.encoder = MLP(enc, c.activation, c.activation, c.alpha) if len(enc) > 1 else None
        self.heads = Dense(enc[-1], 2 * c.latent_dim)
        self.decoder = MLP(dec, c.activation, _decoder_output_activation(c.likelihood), c.alpha)
        self.layers = {}
        for i, layer in enumerate(self.encoder.layers if self.encoder else []):
            self.layers[f"encoder.{i}"] = layer
        self.layers["heads"] = self.heads
        for i, layer in enumerate(self.decoder.layers[:-1]):
            self.layers[f"decoder.{i}"] = layer
        self.layers["output"] = self.decoder.layers[-1]

    def _exported(self):
        z = self.config.latent_dim
        for name, layer in self.layers.items():
            if layer is self.heads:
                for head, part in (("mu", slice(None, z)), ("logvar", slice(z, None))):
                    yield f"{head}.weight", layer.weight[part], layer.dweight[part]
                    yield f"{head}.bias", layer.bias[part], layer.dbias[part]
            else:
                yield f"{name}.weight", layer.weight, layer.dweight
                yield f"{name}.bias", layer.bias, layer.dbias

    # -- the pieces

    def _encode(self, x: np.ndarray):
        """x (B, D) -> views mu (B, Z), logvar (B, Z) of the heads' buffer."""
        h = self.encoder.forward(x) if self.encoder else x
        heads = self.heads.forward(h)
        z = self.config.latent_dim
        mu, logvar = heads[:, :z], heads[:, z:]
        bounds = getattr(self.config, "logvar_bounds", None)
        if bounds is not None:
            mask = self._step_buffers(x.shape[0]).setdefault("logvar_mask", np.empty(logvar.shape, bool))
            logvar, self._clamp_cache = ops.clamp_forward(logvar, *bounds, out=logvar, mask=mask)
        return mu, logvar

    def _encoder_backward(self, dmu_dlogvar: np.ndarray) -> None:
        if getattr(self.config, "logvar_bounds", None) is not None:
            dlogvar = dmu_dlogvar[:, self.config.latent_dim :]
            ops.clamp_backward(dlogvar, self._clamp_cache, out=dlogvar)
        dh = self.heads.backward(dmu_dlogvar, need_dx=self.encoder is not None)
        if self.encoder:
            self.encoder.backward(dh, need_dx=False)

    def _dheads_buffer(self, batch: int) -> np.ndarray:
        buf = self._dheads.get(batch)
        if buf is None:
            buf = self._dheads[batch] = np.empty((batch, 2 * self.config.latent_dim), self.dtype)
        return buf

    def _step_buffers(self, batch: int) -> dict[str, np.ndarray]:
        """Per-batch-size buffers of one step: eps, std, z (B, Z), probs (B, D), recon and kl rows (B,)."""
        bufs = self._bufs.get(batch)
        if bufs is None:
            if len(self._bufs) >= 8:
                self._bufs.clear()
            z, d, t = self.config.latent_dim, self.config.input_dim, self.dtype
            bufs = self._bufs[batch] = {
                "eps": np.empty((batch, z), t), "std": np.empty((batch, z), t), "z": np.empty((batch, z), t),
                "probs": np.empty((batch, d), t), "work": np.empty((batch, d), t),
                "recon": np.empty(batch, t), "kl": np.empty(batch, t),
            }
        return bufs

    def _fresh_eps(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        """Standard-normal noise (B, Z), drawn into the step's buffer."""
        return rng.standard_normal(out=self._step_buffers(batch)["eps"], dtype=self.dtype)

    def _recon_forward(self, out: np.ndarray, x: np.ndarray, bufs: dict):
        """The likelihood's forward with reduction "none", into the step's buffers where it takes them."""
        likelihood = self.config.likelihood
        if likelihood == "bernoulli":
            return ops.bce_with_logits_forward(out, x, "none", probs=bufs["probs"], rows=bufs["recon"], work=bufs["work"])
        if likelihood == "gaussian":
            return ops.gaussian_nll_forward(out, x, "none", rows=bufs["recon"])
        return self._nll_forward(out, x, "none")

    def forward(self, x: np.ndarray, eps: np.ndarray):
        """One-sample negative ELBO terms per example, caching what :meth:`backward` needs.

        Parameters
        ----------
        x : (B, D) array, checked
        eps : (B, Z) array

        Returns
        -------
        recon : (B,) array, -log p(x | z) per example
        kl : (B,) array, KL(q(z|x) || p(z)) per example
        """
        bufs = self._step_buffers(x.shape[0])
        mu, logvar = self._encode(x)
        z, self._sampler_cache = ops.reparameterize_forward(mu, logvar, eps, out=bufs["z"], std=bufs["std"])
        out = self.decoder.forward(z)
        recon, self._nll_cache = self._recon_forward(out, x, bufs)
        kl, self._kl_cache = ops.kl_normal_forward(mu, logvar, "none", rows=bufs["kl"])
        return recon, kl

    def backward(self, drecon: np.ndarray, dkl: np.ndarray) -> None:
        """Fill ``params.grad`` with d/dtheta of sum_i drecon[i] recon_i + dkl[i] kl_i.

        Either part may be zero, which splits a gradient exactly into its reconstruction and KL parts.

        Parameters
        ----------
        drecon, dkl : (B,) arrays
        """
        dout = self._nll_backward(drecon, self._nll_cache, out=self.decoder.output_grad_buffer(len(drecon)))
        dz = self.decoder.backward(dout)
        dheads = self._dheads_buffer(len(drecon))
        z = self.config.latent_dim
        dmu, dlogvar = dheads[:, :z], dheads[:, z:]
        ops.reparameterize_backward(dz, self._sampler_cache, dmu, dlogvar)
        ops.kl_normal_backward(dkl, self._kl_cache, dmu, dlogvar, accumulate=True)
        self._encoder_backward(dheads)

    def _loss_and_backward(self, x: np.ndarray, eps=None, rng=None) -> LossTerms:
        """The training step's core: forward, backward into ``params.grad``, batch means."""
        if eps is None:
            if rng is None:
                raise ValueError("pass eps (B, Z) or rng (an np.random.Generator) to draw it")
            eps = self._fresh_eps(x.shape[0], rng)
        recon, kl = self.forward(x, eps)
        batch = x.shape[0]
        self.backward(self._row_scale(batch, 1.0), self._row_scale(batch, self.kl_weight))
        r, k = float(recon.mean(dtype=np.float64)), float(kl.mean(dtype=np.float64))
        return LossTerms(r + self.kl_weight * k, r, k)

    def loss_and_grads(self, x, eps=None, rng=None):
        """Batch-mean negative ELBO and its gradients.

        Parameters
        ----------
        x : (B, D) array in the model's value range
        eps : (B, Z) array, optional
            The reparameterization noise; drawn from ``rng`` when not given.
        rng : np.random.Generator, optional

        Returns
        -------
        terms : LossTerms
            ``total = recon + beta * kl``, nats per example.
        grads : dict of name -> array
            Gradients of ``terms.total``, keyed like :meth:`state_dict` (views; overwritten by the next call).
        """
        x = self.check_input(x)
        eps = self._check_noise(x, eps, rng)
        return self._loss_and_backward(x, eps, rng), self.gradients()

    # -- inference

    def encode(self, x, batch_size: int = 1000):
        """Posterior parameters: mu (N, Z) and logvar (N, Z) (copies)."""
        x = self.check_input(x)
        both = self._batched(lambda xb: np.concatenate(self._encode(xb), axis=1), x, batch_size)
        z = self.config.latent_dim
        return both[:, :z], both[:, z:]

    def decode(self, z, batch_size: int = 1000) -> np.ndarray:
        """Mean of p(x | z) for codes z (N, Z) -> (N, D)."""
        z = np.asarray(z, dtype=self.dtype)
        if z.ndim != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"expected z of shape (N, {self.config.latent_dim}), got {z.shape}")
        return self._batched(lambda zb: _decoder_mean(self.config.likelihood, self.decoder.forward(zb)), z, batch_size)

    def reconstruct(self, x, batch_size: int = 1000) -> np.ndarray:
        """Decode the posterior mean: (N, D) -> (N, D)."""
        mu, _ = self.encode(x, batch_size)
        return self.decode(mu, batch_size)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Decode n draws from the prior N(0, I): (n, D) means of p(x|z)."""
        n, rng = self._check_count(n), self._check_rng(rng)
        return self.decode(rng.standard_normal((n, self.config.latent_dim), dtype=self.dtype))

    def evaluate(self, x, rng: np.random.Generator, batch_size: int = 1000) -> LossTerms:
        """Mean negative ELBO (one sample per image), reconstruction and KL over a whole set."""
        x, rng = self.check_input(x), self._check_rng(rng)
        recon = kl = 0.0
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            r, k = self.forward(xb, rng.standard_normal((len(xb), self.config.latent_dim), dtype=self.dtype))
            recon += float(r.sum(dtype=np.float64))
            kl += float(k.sum(dtype=np.float64))
        recon, kl = recon / len(x), kl / len(x)
        return LossTerms(recon + self.config.beta * kl, recon, kl)


# ----------------------------------------------------------------------------- deterministic autoencoders


@dataclass
class AutoencoderConfig:
    input_dim: int = 784  # D
    hidden: tuple[int, ...] = (128, 64, 12)  # encoder widths; the decoder mirrors them
    latent_dim: int = 3  # Z, the code
    activation: str = "relu"  # hidden-layer activation
    output_activation: str = "tanh"  # decoder output; tanh for data scaled to [-1, 1]
    value_range: tuple[float, float] = (-1.0, 1.0)  # the data's range (and the DAE's clip range)
    alpha: float = 0.01  # LeakyReLU slope


class Autoencoder(Model):
    """Deterministic MLP autoencoder, loss = squared error summed over pixels, mean over the batch.

    Default: 784-128-64-12-3 ReLU encoder, mirrored decoder with a tanh output, data in [-1, 1].
    The baseline the VAE improves on: its code space has no prior to sample from.
    """

    kind = "ae"

    def __init__(self, input_dim=784, hidden=(128, 64, 12), latent_dim=3, activation="relu", output_activation="tanh",
                 value_range=(-1.0, 1.0), alpha=0.01, dtype=np.float32, seed=0):
        self.config = self._make_config(input_dim, hidden, latent_dim, activation, output_activation, value_range, alpha)
        c = self.config
        for act in (c.activation, c.output_activation):
            if act not in ops.ACTIVATIONS:
                raise ValueError(f"unknown activation {act!r}: expected one of {', '.join(ops.ACTIVATIONS)}")
        self.value_range = c.value_range
        self.encoder = MLP([c.input_dim, *c.hidden, c.latent_dim], c.activation, "identity", c.alpha)
        self.decoder = MLP([c.latent_dim, *reversed(c.hidden), c.input_dim], c.activation, c.output_activation, c.alpha)
        self.layers = {f"encoder.{i}": l for i, l in enumerate(self.encoder.layers)}
        self.layers.update({f"decoder.{i}": l for i, l in enumerate(self.decoder.layers)})
        self._allocate(dtype, seed)

    def _make_config(self, input_dim, hidden, latent_dim, activation, output_activation, value_range, alpha):
        return AutoencoderConfig(int(input_dim), tuple(int(h) for h in hidden), int(latent_dim), activation,
                                 output_activation, tuple(float(v) for v in value_range), float(alpha))

    def _code(self, x: np.ndarray, eps) -> np.ndarray:
        return self.encoder.forward(x)

    def _code_backward(self, dcode: np.ndarray) -> None:
        self.encoder.backward(dcode, need_dx=False)

    def _regulariser(self, code: np.ndarray):
        return None

    def forward(self, x_in: np.ndarray, x_target: np.ndarray, eps=None):
        """Per-example reconstruction error (B,) and regulariser (B,) (zeros for a plain AE)."""
        code = self._code(x_in, eps)
        out = self.decoder.forward(code)
        recon, self._mse_cache = ops.mse_forward(out, x_target, "none")
        reg = self._regulariser(code)
        return recon, (np.zeros_like(recon) if reg is None else reg)

    def backward(self, drecon: np.ndarray, dreg: np.ndarray) -> None:
        dout = ops.mse_backward(drecon, self._mse_cache, out=self.decoder.output_grad_buffer(len(drecon)))
        dcode = self.decoder.backward(dout)
        self._add_regulariser_grad(dreg, dcode)
        self._code_backward(dcode)

    def _add_regulariser_grad(self, dreg, dcode) -> None:
        pass

    def _corrupt(self, x: np.ndarray, rng) -> np.ndarray:
        return x

    def _loss_and_backward(self, x: np.ndarray, eps=None, rng=None) -> LossTerms:
        x_in = self._corrupt(x, rng)
        recon, reg = self.forward(x_in, x, self._draw_eps(x, eps, rng))
        batch = x.shape[0]
        one = self._row_scale(batch, 1.0)
        self.backward(one, one)
        r, k = float(recon.mean(dtype=np.float64)), float(reg.mean(dtype=np.float64))
        return LossTerms(r + k, r, k)

    def _draw_eps(self, x, eps, rng):
        return None

    def loss_and_grads(self, x, eps=None, rng=None):
        """Batch-mean loss and its gradients (see :meth:`VAE.loss_and_grads`)."""
        x = self.check_input(x)
        return self._loss_and_backward(x, eps, rng), self.gradients()

    def encode(self, x, batch_size: int = 1000) -> np.ndarray:
        """Codes (N, Z) (copies)."""
        x = self.check_input(x)
        return self._batched(self.encoder.forward, x, batch_size)

    def decode(self, z, batch_size: int = 1000) -> np.ndarray:
        z = np.asarray(z, dtype=self.dtype)
        if z.ndim != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"expected z of shape (N, {self.config.latent_dim}), got {z.shape}")
        return self._batched(self.decoder.forward, z, batch_size)

    def reconstruct(self, x, batch_size: int = 1000) -> np.ndarray:
        return self.decode(self.encode(x, batch_size), batch_size)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Decode codes drawn from a Gaussian fitted to nothing: N(0, I). AEs have no prior, which
        is exactly why their samples look poor; provided for the side-by-side picture."""
        n, rng = self._check_count(n), self._check_rng(rng)
        return self.decode(rng.standard_normal((n, self.config.latent_dim), dtype=self.dtype))

    def evaluate(self, x, rng: np.random.Generator, batch_size: int = 1000) -> LossTerms:
        x, rng = self.check_input(x), self._check_rng(rng)
        recon = reg = 0.0
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            r, k = self.forward(self._corrupt(xb, rng), xb, self._draw_eps(xb, None, rng))
            recon += float(r.sum(dtype=np.float64))
            reg += float(k.sum(dtype=np.float64))
        return LossTerms((recon + reg) / len(x), recon / len(x), reg / len(x))


@dataclass
class DenoisingAutoencoderConfig(AutoencoderConfig):
    noise: str = "salt_pepper"  # corruption: salt_pepper (pixels set to the range's ends) or gaussian
    noise_level: float = 0.2  # salt_pepper: fraction of pixels hit; gaussian: noise std


class DenoisingAutoencoder(Autoencoder):
    """Autoencoder trained to undo corruption: each batch is corrupted afresh, the loss compares
    the reconstruction of the corrupted input with the clean input."""

    kind = "dae"

    def __init__(self, *args, noise: str = "salt_pepper", noise_level: float = 0.2, **kwargs):
        if noise not in ("salt_pepper", "gaussian"):
            raise ValueError(f"unknown noise {noise!r}: expected salt_pepper or gaussian")
        if not 0 <= noise_level <= (1 if noise == "salt_pepper" else np.inf):
            raise ValueError(f"expected noise_level in [0, 1] for salt_pepper or >= 0 for gaussian, got {noise_level}")
        self._noise = (noise, float(noise_level))
        super().__init__(*args, **kwargs)

    def _make_config(self, *args):
        base = super()._make_config(*args)
        return DenoisingAutoencoderConfig(**dataclasses.asdict(base), noise=self._noise[0], noise_level=self._noise[1])

    def corrupt(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A corrupted copy of x (B, D), clipped to the value range."""
        if rng is None:
            raise ValueError("a denoising autoencoder needs rng (an np.random.Generator) to corrupt its input")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"expected rng to be an np.random.Generator, got {type(rng).__name__}")
        lo, hi = self.config.value_range
        if self.config.noise == "gaussian":
            noisy = x + rng.standard_normal(x.shape, dtype=x.dtype) * x.dtype.type(self.config.noise_level)
            return np.clip(noisy, lo, hi, out=noisy)
        hit = rng.random(x.shape, dtype=x.dtype) < self.config.noise_level
        salt = rng.random(x.shape, dtype=x.dtype) < 0.5
        return np.where(hit, np.where(salt, x.dtype.type(hi), x.dtype.type(lo)), x)

    _corrupt = corrupt


@dataclass
class PoorMansVAEConfig(AutoencoderConfig):
    hidden: tuple[int, ...] = (392,)
    latent_dim: int = 20
    activation: str = "sigmoid"
    output_activation: str = "sigmoid"
    value_range: tuple[float, float] = (0.0, 1.0)
    noise_std: float = 1.0  # std of the noise added to the code


class PoorMansVAE(Autoencoder):
    """The "poor man's VAE": a deterministic encoder whose code gets unit Gaussian noise,
    ``z = h + eps``, and a penalty on the code's distance to the origin in place of the KL:

    ``loss = sum_j (x_hat_j - x_j)^2 + ||z||_2`` per example, mean over the batch.

    Default: sigmoid MLP 784-392-Z-392-784 (linear code layer, sigmoid output), data in [0, 1].
    """

    kind = "poor"

    def __init__(self, input_dim=784, hidden=(392,), latent_dim=20, activation="sigmoid", output_activation="sigmoid",
                 value_range=(0.0, 1.0), alpha=0.01, noise_std=1.0, dtype=np.float32, seed=0):
        self._noise_std = float(noise_std)
        super().__init__(input_dim, hidden, latent_dim, activation, output_activation, value_range, alpha, dtype, seed)

    def _make_config(self, *args):
        base = super()._make_config(*args)
        return PoorMansVAEConfig(**dataclasses.asdict(base), noise_std=self._noise_std)

    def _draw_eps(self, x, eps, rng):
        eps = self._check_noise(x, eps, rng)
        if eps is None:
            eps = rng.standard_normal((x.shape[0], self.config.latent_dim), dtype=self.dtype)
        return eps

    def _code(self, x, eps):
        h = self.encoder.forward(x)
        z, self._noise_cache = ops.add_noise_forward(h, eps, scale=self.config.noise_std)
        return z

    def _regulariser(self, z):
        norms, self._norm_cache = ops.l2_norm_forward(z, "none")
        return norms

    def _add_regulariser_grad(self, dreg, dz) -> None:
        dz += ops.l2_norm_backward(dreg, self._norm_cache)

    def _code_backward(self, dz) -> None:
        self.encoder.backward(ops.add_noise_backward(dz, self._noise_cache), need_dx=False)


# ----------------------------------------------------------------------------- conditional VAE


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
    input_dim: int = 784  # D, pixels per image
    num_classes: int = 10  # C, labels are integers in [0, C)
    hidden: tuple[int, ...] = (400,)  # encoder widths over [x, onehot(y)]; the decoder mirrors them
    latent_dim: int = 20  # Z
    activation: str = "relu"  # hidden-layer activation, in all three networks
    likelihood: str = "bernoulli"  # p(x|z,y): bernoulli (BCE on logits), gaussian (unit variance), continuous_bernoulli
    beta: float = 1.0  # KL weight; beta = 1 gives the conditional ELBO
    alpha: float = 0.01  # LeakyReLU slope, when activation = leaky_relu
    learned_prior: bool = True  # p(z|y) = N(mu_p(y), diag exp(logvar_p(y))) from a prior network; False: N(0, I)
    prior_hidden: tuple[int, ...] = (64,)  # prior-network widths over onehot(y); unused without a learned prior


class CVAE(VAE):
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
    in [0, C) (see :meth:`check_labels`). ``conditional = True`` tells the training loop to pass them.
    The class reuses the VAE's config checks, encoder wiring and buffers, but its methods take
    labels, so it is not a drop-in VAE: code that handles both checks ``model.conditional``.

    Parameters
    ----------
    input_dim, num_classes, hidden, latent_dim, activation, likelihood, beta, alpha, learned_prior, prior_hidden
        See :class:`CVAEConfig`.
    dtype : float32 (training) or float64 (gradient checks)
    seed : int
        Seed of the parameter initialisation (PyTorch's ``nn.Linear`` default init).

    State-dict keys, in forward order: ``encoder.{i}``, ``mu``, ``logvar``, ``prior.{i}``,
    ``prior_mu``, ``prior_logvar`` (the last three only with a learned prior), ``decoder.{i}``,
    ``output`` (each ``.weight``/``.bias``). As in the VAE, each pair of heads is one (2Z, H) layer
    whose halves are exported as the two heads.
    """

    kind = "cvae"
    conditional = True
    # internal (2Z, H) layers and the names their (mu, logvar) halves are exported under
    _SPLIT_HEADS = {"heads": ("mu", "logvar"), "prior_heads": ("prior_mu", "prior_logvar")}

    def __init__(
        self,
        input_dim: int = 784,
        num_classes: int = 10,
        hidden=(400,),
        latent_dim: int = 20,
        activation: str = "relu",
        likelihood: str = "bernoulli",
        beta: float = 1.0,
        alpha: float = 0.01,
        learned_prior: bool = True,
        prior_hidden=(64,),
        dtype=np.float32,
        seed: int = 0,
    ):
        self.config = CVAEConfig(
            int(input_dim), int(num_classes), tuple(int(h) for h in hidden), int(latent_dim), activation, likelihood,
            float(beta), float(alpha), bool(learned_prior), tuple(int(h) for h in prior_hidden),
        )
        self._validate_config()
        self.kl_weight = self.config.beta  # the trainer anneals this during KL warm-up
        self._build_layers()
        self._allocate(dtype, seed)
        self._dheads: dict[int, np.ndarray] = {}
        self._bufs: dict[int, dict[str, np.ndarray]] = {}
        self._work: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _validate_config(self) -> None:
        super()._validate_config()
        c = self.config
        if c.num_classes < 1 or any(h < 1 for h in c.prior_hidden):
            raise ValueError(f"expected positive sizes, got num_classes={c.num_classes}, prior_hidden={c.prior_hidden}")

    def _encoder_sizes(self):
        return [self.config.input_dim + self.config.num_classes, *self.config.hidden]

    def _decoder_sizes(self):
        c = self.config
        return [c.latent_dim + c.num_classes, *reversed(c.hidden), c.input_dim]

    def _build_layers(self) -> None:
        super()._build_layers()
        c = self.config
        self.prior_net = self.prior_heads = None
        if not c.learned_prior:
            return
        sizes = [c.num_classes, *c.prior_hidden]
        self.prior_net = MLP(sizes, c.activation, c.activation, c.alpha) if len(sizes) > 1 else None
        self.prior_heads = Dense(sizes[-1], 2 * c.latent_dim)
        prior = [(f"prior.{i}", layer) for i, layer in enumerate(self.prior_net.layers if self.prior_net else [])]
        prior.append(("prior_heads", self.prior_heads))
        # forward order: encoder, heads, prior network, prior heads, decoder
        order = list(self.layers.items())
        split = [name for name, _ in order].index("heads") + 1
        self.layers = dict(order[:split] + prior + order[split:])

    def _exported(self):
        z = self.config.latent_dim
        for name, layer in self.layers.items():
            heads = self._SPLIT_HEADS.get(name)
            if heads is None:
                yield f"{name}.weight", layer.weight, layer.dweight
                yield f"{name}.bias", layer.bias, layer.dbias
                continue
            for head, part in zip(heads, (slice(None, z), slice(z, None))):
                yield f"{head}.weight", layer.weight[part], layer.dweight[part]
                yield f"{head}.bias", layer.bias[part], layer.dbias[part]

    # -- checks

    def check_labels(self, y, batch: int | None = None, name: str = "y") -> np.ndarray:
        """``y`` as an integer array (B,) of class labels in [0, C), with B = ``batch`` when given.

        Raises
        ------
        ValueError
            For any other shape, a non-integer dtype (integral floats included: cast them with
            ``y.astype(int)``) or a label out of range.
        """
        y = np.asarray(y)
        c = self.config.num_classes
        expected = f"expected {name} of shape ({'B' if batch is None else batch},) with integer class labels in [0, {c})"
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

    def _workspace(self, batch: int):
        """Per-batch-size buffers: [x, onehot(y)] (B, D + C), [z, onehot(y)] (B, Z + C) and
        d[mu_p, logvar_p] (B, 2Z), so a training step allocates no concatenations."""
        work = self._work.get(batch)
        if work is None:
            c = self.config
            work = self._work[batch] = (
                np.empty((batch, c.input_dim + c.num_classes), self.dtype),
                np.empty((batch, c.latent_dim + c.num_classes), self.dtype),
                np.empty((batch, 2 * c.latent_dim), self.dtype),
            )
        return work

    def _prior(self, onehot: np.ndarray):
        """onehot(y) (B, C) -> views mu_p (B, Z), logvar_p (B, Z) of the prior heads' buffer."""
        h = self.prior_net.forward(onehot) if self.prior_net else onehot
        heads = self.prior_heads.forward(h)
        z = self.config.latent_dim
        return heads[:, :z], heads[:, z:]

    def _prior_backward(self, dprior: np.ndarray) -> None:
        dh = self.prior_heads.backward(dprior, need_dx=self.prior_net is not None)
        if self.prior_net:
            self.prior_net.backward(dh, need_dx=False)

    def forward(self, x: np.ndarray, y: np.ndarray, eps: np.ndarray):
        """One-sample negative conditional ELBO terms per example, caching what :meth:`backward` needs.

        Parameters
        ----------
        x : (B, D) array, checked
        y : (B,) integer array, checked
        eps : (B, Z) array

        Returns
        -------
        recon : (B,) array, -log p(x | z, y) per example
        kl : (B,) array, KL(q(z|x,y) || p(z|y)) per example
        """
        c = self.config
        xy, zy, _ = self._workspace(x.shape[0])
        _fill_conditioned(xy, c.input_dim, x, y)  # (B, D + C)
        _fill_conditioned(zy, c.latent_dim, None, y)  # (B, Z + C), z written below
        mu, logvar = self._encode(xy)
        bufs = self._step_buffers(x.shape[0])
        _, self._sampler_cache = ops.reparameterize_forward(mu, logvar, eps, out=zy[:, : c.latent_dim], std=bufs["std"])
        out = self.decoder.forward(zy)
        recon, self._nll_cache = self._recon_forward(out, x, bufs)
        if c.learned_prior:
            mu_p, logvar_p = self._prior(xy[:, c.input_dim :])
            kl, self._kl_cache = ops.kl_gaussians_forward(mu, logvar, mu_p, logvar_p, "none", rows=bufs["kl"])
        else:
            kl, self._kl_cache = ops.kl_normal_forward(mu, logvar, "none", rows=bufs["kl"])
        return recon, kl

    def backward(self, drecon: np.ndarray, dkl: np.ndarray) -> None:
        """Fill ``params.grad`` with d/dtheta of sum_i drecon[i] recon_i + dkl[i] kl_i.

        Either part may be zero, which splits a gradient exactly into its reconstruction and KL
        parts. The KL's gradient reaches both the encoder heads (added to the sampler's) and the
        prior network.

        Parameters
        ----------
        drecon, dkl : (B,) arrays
        """
        batch = len(drecon)
        z = self.config.latent_dim
        dout = self._nll_backward(drecon, self._nll_cache, out=self.decoder.output_grad_buffer(batch))
        dzy = self.decoder.backward(dout)  # (B, Z + C); the one-hot columns' gradient is dropped
        dheads = self._dheads_buffer(batch)
        dmu, dlogvar = dheads[:, :z], dheads[:, z:]
        ops.reparameterize_backward(dzy[:, :z], self._sampler_cache, dmu, dlogvar)
        if self.config.learned_prior:
            dprior = self._workspace(batch)[2]  # (B, 2Z)
            ops.kl_gaussians_backward(dkl, self._kl_cache, dmu, dlogvar, dprior[:, :z], dprior[:, z:], accumulate=True)
            self._prior_backward(dprior)
        else:
            ops.kl_normal_backward(dkl, self._kl_cache, dmu, dlogvar, accumulate=True)
        self._encoder_backward(dheads)

    def _loss_and_backward(self, x: np.ndarray, y: np.ndarray, eps=None, rng=None) -> LossTerms:
        """The training step's core, inputs unchecked: forward, backward into ``params.grad``, batch means."""
        if eps is None:
            if rng is None:
                raise ValueError("pass eps (B, Z) or rng (an np.random.Generator) to draw it")
            eps = self._fresh_eps(x.shape[0], rng)
        recon, kl = self.forward(x, y, eps)
        batch = x.shape[0]
        self.backward(self._row_scale(batch, 1.0), self._row_scale(batch, self.kl_weight))
        r, k = float(recon.mean(dtype=np.float64)), float(kl.mean(dtype=np.float64))
        return LossTerms(r + self.kl_weight * k, r, k)

    def loss_and_grads(self, x, y, eps=None, rng=None):
        """Batch-mean negative conditional ELBO and its gradients.

        Parameters
        ----------
        x : (B, D) array in the model's value range
        y : (B,) integer array of class labels in [0, C)
        eps : (B, Z) array, optional
            The reparameterization noise; drawn from ``rng`` when not given.
        rng : np.random.Generator, optional

        Returns
        -------
        terms : LossTerms
            ``total = recon + beta * kl``, nats per example.
        grads : dict of name -> array
            Gradients of ``terms.total``, keyed like :meth:`state_dict` (views; overwritten by the next call).
        """
        x = self.check_input(x)
        y = self.check_labels(y, len(x))
        eps = self._check_noise(x, eps, rng)
        return self._loss_and_backward(x, y, eps, rng), self.gradients()

    # -- inference

    def _labelled_batches(self, fn, a: np.ndarray, y: np.ndarray, batch_size: int):
        """Apply ``fn(a_batch, y_batch)`` over batches and stack the (copied) results."""
        return self._batched(lambda rows: fn(a[rows], y[rows]), np.arange(len(a)), batch_size)

    def encode(self, x, y, batch_size: int = 1000):
        """Posterior parameters of q(z | x, y): mu (N, Z) and logvar (N, Z) (copies)."""
        x = self.check_input(x)
        y = self.check_labels(y, len(x))

        def heads(xb, yb):
            xy = _fill_conditioned(self._workspace(len(xb))[0], self.config.input_dim, xb, yb)  # (b, D + C)
            return np.concatenate(self._encode(xy), axis=1)

        both = self._labelled_batches(heads, x, y, batch_size)
        z = self.config.latent_dim
        return both[:, :z], both[:, z:]

    def decode(self, z, y, batch_size: int = 1000) -> np.ndarray:
        """Mean of p(x | z, y) for codes z (N, Z) and labels y (N,) -> (N, D)."""
        z = np.asarray(z, dtype=self.dtype)
        if z.ndim != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"expected z of shape (N, {self.config.latent_dim}), got {z.shape}")
        y = self.check_labels(y, len(z))

        def mean(zb, yb):
            zy = _fill_conditioned(self._workspace(len(zb))[1], self.config.latent_dim, zb, yb)  # (b, Z + C)
            return _decoder_mean(self.config.likelihood, self.decoder.forward(zy))

        return self._labelled_batches(mean, z, y, batch_size)

    def reconstruct(self, x, y, batch_size: int = 1000) -> np.ndarray:
        """Decode the posterior mean: (N, D) and labels (N,) -> (N, D)."""
        mu, _ = self.encode(x, y, batch_size)
        return self.decode(mu, y, batch_size)

    def prior(self, y, batch_size: int = 1000):
        """Parameters of p(z | y): mu_p (N, Z) and logvar_p (N, Z) (copies; zeros for the fixed prior)."""
        y = self.check_labels(y)
        z = self.config.latent_dim
        if not self.config.learned_prior:
            return np.zeros((len(y), z), self.dtype), np.zeros((len(y), z), self.dtype)

        def heads(yb):
            onehot = _fill_conditioned(np.empty((len(yb), self.config.num_classes), self.dtype), 0, None, yb)
            return np.concatenate(self._prior(onehot), axis=1)

        both = self._batched(heads, y, batch_size)
        return both[:, :z], both[:, z:]

    def _sample_labelled(self, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Decode one draw of z ~ p(z | y) per label: y (N,) -> (N, D) means of p(x | z, y)."""
        mu_p, logvar_p = self.prior(y)
        z, _ = ops.reparameterize_forward(mu_p, logvar_p, rng=rng)
        return self.decode(z, y)

    def sample(self, n: int, rng: np.random.Generator, label=None) -> np.ndarray:
        """Decode n draws from the prior p(z | y): (n, D) means of p(x | z, y).

        ``label`` (an int in [0, C)) conditions every draw on that class; None cycles the labels
        0, 1, ..., C - 1, 0, 1, ... (sample i has label ``i % C``).
        """
        n, c = int(n), self.config.num_classes
        if n < 1:
            raise ValueError(f"expected n >= 1 samples, got {n}")
        if label is None:
            y = np.arange(n) % c
        elif isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < c:
            y = np.full(n, label)
        else:
            raise ValueError(f"expected label an integer class in [0, {c}) or None, got {label!r}")
        return self._sample_labelled(y, rng)

    def class_grid(self, n_per_class: int, rng: np.random.Generator) -> np.ndarray:
        """``n_per_class`` samples of every class, (C, n, D): row c holds draws conditioned on y = c
        (for :func:`npvae.viz.plots.plot_class_grid`)."""
        n, c = int(n_per_class), self.config.num_classes
        if n < 1:
            raise ValueError(f"expected n_per_class >= 1, got {n}")
        return self._sample_labelled(np.repeat(np.arange(c), n), rng).reshape(c, n, self.config.input_dim)

    def evaluate(self, x, y, rng: np.random.Generator, batch_size: int = 1000) -> LossTerms:
        """Mean negative conditional ELBO (one sample per image), reconstruction and KL over a whole set."""
        x = self.check_input(x)
        y = self.check_labels(y, len(x))
        recon = kl = 0.0
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            r, k = self.forward(xb, yb, rng.standard_normal((len(xb), self.config.latent_dim), dtype=self.dtype))
            recon += float(r.sum(dtype=np.float64))
            kl += float(k.sum(dtype=np.float64))
        recon, kl = recon / len(x), kl / len(x)
        return LossTerms(recon + self.config.beta * kl, recon, kl)


MODELS = {"vae": VAE, "ae": Autoencoder, "dae": DenoisingAutoencoder, "poor": PoorMansVAE, "cvae": CVAE}


def build_model(kind: str, config: dict, dtype=np.float32, seed: int = 0) -> Model:
    """A model of ``kind`` from a config dict (as saved in checkpoints)."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {', '.join(MODELS)}")
    cls = MODELS[kind]
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    try:
        return cls(**config, dtype=dtype, seed=seed)
    except TypeError as exc:
        raise ValueError(f"config does not fit model {kind!r}: {exc}") from None
