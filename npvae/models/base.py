"""The model interface every npvae model offers, and the capabilities a model may add to it.

The interface (all that the trainer, the study tools, the figures and the CLI call)
---------------------------------------------------------------------------------
- ``loss_and_grads(x, y=None, eps=None, rng=None, *, target=None, check=True) -> (LossTerms, grads)``:
  the batch-mean loss and its reconstruction and regulariser parts; gradients keyed like
  :meth:`Model.state_dict`. ``target`` trains input -> target pairs (denoising); ``check=False``
  skips the input checks (the trainer checks whole arrays once).
- ``forward(x, y=None, eps=None, rng=None, target=None) -> (recon, reg)`` per example (B,), and
  ``backward(drecon, dreg)``, which fills ``params.grad`` with d/dtheta of
  ``sum_i drecon[i] recon_i + dreg[i] reg_i`` (either part may be zero: an exact split).
- ``encode``, ``codes``, ``decode``, ``reconstruct``, ``sample``, ``evaluate``: inference, batched.
- ``state_dict`` / ``load_state_dict`` / ``parameters`` / ``gradients``; ``spec()``, which
  rebuilds the model with :func:`npvae.models.from_spec`.

Every method takes ``y=None``: unconditional models ignore it; conditional ones
(:class:`Conditional`) require it and say so.

Capabilities, checked with ``isinstance``
-----------------------------------------
- :class:`GaussianLatent`: q(z|x) is a diagonal Gaussian, the regulariser is a KL to a prior
  ``prior(n, y)``; the pieces ``posterior_forward/backward``, ``nll_forward/backward`` and
  ``latent_grads`` expose the reparameterization path to the study tools.
- :class:`StandardNormalPrior`: the prior is the fixed N(0, I), so log p(z) needs no labels
  (importance-weighted likelihoods).
- :class:`Conditional`: a model of p(x | y) with class labels y in [0, C).
- :class:`Denoising`: the model corrupts its input (``corrupt(x, rng)``) and reconstructs the clean one.

What a model's loss is called, and its unit, is the model's own :attr:`Model.loss_names` (a
:class:`LossNames`); reports read it and never branch on the kind of model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .. import memory
from ..layers import Layer, Parameters, Sequential, Workspace, check_dtype, layer_spec
from ..ops import pixels_to_range


@dataclass(frozen=True)
class LossTerms:
    """Batch means, per example: ``total = recon + weight * reg`` (weight = beta for VAEs).

    ``reg`` is the model's regulariser: KL(q(z|x) || p(z)) for VAEs, the code-norm penalty of the poor
    man's VAE, the sparsity or contraction penalty, 0 for plain autoencoders. It was called ``kl`` when
    every model here was a VAE; ``terms.kl`` still reads it.
    """

    total: float  # the training objective (negative ELBO for VAEs), per example
    recon: float  # reconstruction term: negative log-likelihood (or squared error), per example
    reg: float  # the regulariser (KL for VAEs), unweighted; what LossNames.reg calls it
    se: float | None = None  # evaluate(): the standard error of total's mean over the examples (NaN for one)

    @property
    def kl(self) -> float:
        """The regulariser under its name from the VAE-only days (:attr:`reg`)."""
        return self.reg


@dataclass(frozen=True)
class LossNames:
    """What a model's loss and its two terms are called in every report (training lines, ``evaluate``,
    the training curves), and their unit: each model declares its own (:attr:`Model.loss_names`), so an
    autoencoder's squared error is never printed as a negative ELBO in nats."""

    total: str  # the objective, LossTerms.total: "negative ELBO", "squared error", ...
    recon: str  # the reconstruction term, LossTerms.recon
    reg: str | None = None  # the second term, LossTerms.reg ("KL", "code norm"); None: the model has none (always 0)
    unit: str | None = None  # "nats" for negative log-likelihoods; None for errors, which carry no unit

    def format(self, total: float, recon: float, reg: float, digits: int = 2, se: float | None = None) -> str:
        """E.g. ``negative ELBO 248.20 nats (recon 230.10, KL 18.10)``, or ``squared error 41.30``; with
        ``se`` (an estimate's standard error) ``negative ELBO 248.20 ± 0.41 nats ...``."""
        unit = f" {self.unit}" if self.unit else ""
        error = f" ± {se:.{digits}f}" if se is not None else ""
        return f"{self.total} {total:.{digits}f}{error}{unit}" + self.parts(recon, reg, digits)

    def parts(self, recon: float, reg: float, digits: int = 2) -> str:
        """`` (recon 230.10, KL 18.10)``; empty for a model whose loss is its reconstruction term alone."""
        return "" if self.reg is None else f" ({self.recon} {recon:.{digits}f}, {self.reg} {reg:.{digits}f})"


_PARAMETER_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("parameter_limit", default=None)


@contextlib.contextmanager
def parameter_limit(scalars: int):
    """Refuse to build a model of more than ``scalars`` parameters inside this block (before any
    allocation): a checkpoint's metadata cannot make npvae allocate more than its arrays hold."""
    token = _PARAMETER_LIMIT.set(int(scalars))
    try:
        yield
    finally:
        _PARAMETER_LIMIT.reset(token)


def check_generator(rng, what: str = "rng") -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"expected {what} to be an np.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    return rng


DEFAULT_SEED = 0  # the seed of the generator that sample() and evaluate() draw from when given no rng


def generator_or_default(rng, what: str = "rng") -> np.random.Generator:
    """``rng`` checked, or a fresh ``np.random.default_rng(DEFAULT_SEED)`` when it is None: inference
    without an rng is reproducible (the same samples and the same loss on every call), as NumPy's
    seeded generators are; pass your own generator for fresh draws."""
    return np.random.default_rng(DEFAULT_SEED) if rng is None else check_generator(rng, what)


def _check_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"expected n, the number of samples, as an integer >= 0, got {n!r}")
    return int(n)


class Model:
    """Shared machinery: parameters, workspace, state dicts, input checks, batched inference.

    A subclass sets ``self.config``, ``self.input_shape`` and ``self.value_range``, builds its parts
    (a dict of name -> :class:`~npvae.layers.Layer`, in forward order) and calls :meth:`_build`;
    then it implements ``forward``, ``backward``, ``encode`` and ``decode``.
    """

    kind = "model"  # the CLI preset's name, for messages and checkpoints
    help = ""  # the preset's one line for ``npvae train --help``
    config_class = None  # the dataclass of ``self.config``; its option() fields are the preset's knobs
    value_range = (0.0, 1.0)
    loss_names = LossNames("loss", "recon", "regulariser")  # how reports name the loss, its terms and unit
    reg_weight = 1.0  # weight of the regulariser in the training loss (beta for VAEs, annealed by warm-up)
    eval_weight = 1.0  # weight of the second term in evaluate's total
    needs_noise = False  # True when forward draws noise (eps), so loss_and_grads needs eps or rng
    # What sample() draws codes from, when the model was trained to make it a distribution of codes ("the
    # prior N(0, I)"); None for autoencoders, whose sample() decodes N(0, I) codes that no loss shaped:
    # no samples of the data, so training draws no samples.png for them and sample() says what they are.
    prior_name: str | None = None
    train_defaults: dict = {}  # a preset's own TrainConfig defaults (batch_size, patience, lr) for the CLI

    # -- construction

    def _build(self, parts: dict[str, Layer], dtype, seed: int) -> None:
        """Bind every layer of ``parts`` to one flat parameter buffer and the model's workspace."""
        self.dtype = check_dtype(dtype)
        self.parts = parts
        self.workspace = Workspace(self.dtype)
        leaves = []
        for name, part in parts.items():
            leaves.extend(part.named_layers(name) if isinstance(part, Sequential) else [(name, part)])
        shapes = {f"{path}.{p}": shape for path, layer in leaves for p, shape in layer.param_shapes().items()}
        limit = _PARAMETER_LIMIT.get()
        needed = sum(math.prod(shape) for shape in shapes.values())
        if limit is not None and needed > limit:
            raise ValueError(f"the model description needs {needed:,} parameters but the file holds {limit:,}; "
                             "the metadata does not match the stored arrays")
        memory.check_parameters(needed, self.dtype.itemsize)  # before the buffers exist
        self.params = Parameters(shapes, self.dtype)
        rng = np.random.default_rng(seed)
        exported = []
        for path, layer in leaves:
            names = layer.param_shapes()
            layer.bind({p: self.params.value(f"{path}.{p}") for p in names},
                       {p: self.params.gradient(f"{path}.{p}") for p in names}, self.workspace, path)
            layer.init(rng)
            exported.extend(layer.state_items(path))
        for name, part in parts.items():
            if isinstance(part, Sequential):
                part.bind({}, {}, self.workspace, name)
        self._exported = exported  # (key, value view, gradient view) in forward order

    def spec(self) -> dict:
        """Everything needed to rebuild this model without code (JSON-able): class, config, parts."""
        return {"class": type(self).__name__, "kind": self.kind,
                "config": dataclasses.asdict(self.config), "dtype": self.dtype.name,
                "input_shape": list(self.input_shape),
                "parts": {name: layer_spec(part) for name, part in self.parts.items()}}

    # -- parameters

    def parameters(self) -> dict[str, np.ndarray]:
        """Parameter views (writes change the model), keyed like :meth:`state_dict`."""
        return {key: value for key, value, _ in self._exported}

    def gradients(self) -> dict[str, np.ndarray]:
        """Views of the gradients written by the last :meth:`loss_and_grads` or :meth:`backward`."""
        return {key: grad for key, _, grad in self._exported}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters in PyTorch ``nn.Linear`` layout, keys in forward order."""
        return {key: value.copy() for key, value, _ in self._exported}

    def load_state_dict(self, state: dict) -> None:
        """Copy ``state`` into the model; every key must be present with the right shape."""
        expected = {key: value.shape for key, value, _ in self._exported}
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
            if array.dtype.itemsize > self.dtype.itemsize and array.size:
                largest = float(np.abs(array).max())
                if largest > np.finfo(self.dtype).max:
                    raise ValueError(f"{key}: holds {largest:.3g}, beyond {self.dtype.name}'s range: it would "
                                     "load as Inf")
        for key, value, _ in self._exported:
            value[...] = arrays[key]

    @property
    def num_parameters(self) -> int:
        return self.params.size

    # -- checks

    @property
    def input_dim(self) -> int:
        """D, values per example."""
        return int(np.prod(self.input_shape))

    def check_input(self, x, name: str = "x") -> np.ndarray:
        """``x`` as a (B, *input_shape) array of the model's dtype, finite and in the model's value range.

        Every method that takes inputs reads them through here, the way :func:`npvae.fit` reads its data:

        - rows whose size is the model's input size are viewed in the model's shape, as PyTorch's
          ``x.view(B, *shape)`` would be: (B, 28, 28) images feed a (784,) model and (B, 784) rows a
          (28, 28) one;        """
        x = np.asarray(x)
        shape = tuple(self.input_shape)
        if x.ndim >= 2 and x.shape[0] >= 1 and x.shape[1:] != shape and math.prod(x.shape[1:]) == self.input_dim:
            x = x.reshape(x.shape[0], *shape)
        if x.shape[1:] != shape or x.ndim < 2 or x.shape[0] < 1:
            expected = ", ".join(("B", *map(str, shape)))
            raise ValueError(f"expected {name} of shape ({expected}) with B >= 1 (or any (B, ...) holding "
                             f"{self.input_dim:,} values per row), got {x.shape}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
            raise TypeError(f"expected {name} with a numeric dtype, got {x.dtype}")
        if x.dtype == np.uint8:  # pixels, scaled as the trainer scales them
            return pixels_to_range(x, *map(float, self.value_range), self.dtype)
        x = np.asarray(x, dtype=self.dtype)
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0]
            raise ValueError(f"{name} contains NaN or Inf (first at index {tuple(int(i) for i in bad)})")
        lo, hi = self.value_range
        if x.min() < lo or x.max() > hi:
            raise ValueError(
                f"expected {name} values in [{lo:g}, {hi:g}] for {self.kind} with "
                f"{self.loss_name}, got range [{x.min():g}, {x.max():g}]"
            )
        return x

    def check_labels(self, y, batch: int | None = None, name: str = "y"):
        """Labels for this model: unconditional models ignore ``y`` (None is returned)."""
        return None

    def check_target(self, target, x: np.ndarray):
        """``target`` (B, *input_shape) checked like ``x``, or None to reconstruct ``x`` itself."""
        if target is None:
            return None
        target = self.check_input(target, "target")
        if len(target) != len(x):
            raise ValueError(f"expected target with one row per input ({len(x)}), got {len(target)}")
        return target

    def check_noise(self, x: np.ndarray, eps, shape=None) -> np.ndarray:
        """``eps`` as a finite array of the model's dtype and ``shape`` (default (B, Z))."""
        shape = (x.shape[0], self.config.latent_dim) if shape is None else tuple(shape)
        eps = np.asarray(eps)
        if eps.shape != shape:
            raise ValueError(f"expected eps of shape {shape}, got {eps.shape}")
        eps = eps.astype(self.dtype, copy=False)
        if not np.isfinite(eps).all():
            raise ValueError("eps contains NaN or Inf")
        return eps

    def _draw_eps(self, batch: int, eps, rng) -> np.ndarray:
        """``eps`` itself, or standard-normal noise (B, Z) drawn from ``rng`` into the workspace."""
        if eps is not None:
            return eps
        if rng is None:
            raise ValueError("pass eps (B, Z) or rng (an np.random.Generator) to draw it")
        buf = self.workspace.get(batch, "eps", (batch, self.config.latent_dim))
        return rng.standard_normal(out=buf, dtype=self.dtype)

    def _row_scale(self, batch: int, weight: float, name: str) -> np.ndarray:
        """The (B,) vector weight / B, the batch mean's gradient, in the workspace buffer ``name``."""
        scale = self.workspace.get(batch, name, (batch,))
        scale.fill(weight / batch)
        return scale

    def _decoder_backward(self, loss, drows: np.ndarray, cache) -> np.ndarray:
        """Backward of ``loss(decoder(h))`` into the decoder's gradients: returns dL/dh.

        The loss writes dL/d(output) (B, D) straight into the buffer the decoder's last layer reads.
        """
        batch = drows.shape[0]
        dout = self.decoder.output_grad_buffer(batch)
        if dout is None:
            dout = self.workspace.get(batch, "dout", (batch, self.input_dim))
        dflat = dout.reshape(batch, -1)
        loss.backward(drows, cache, out=dflat)
        return self.decoder.backward(dflat.reshape(batch, *self.input_shape))

    # -- the training step

    def loss_and_grads(self, x, y=None, eps=None, rng=None, *, target=None, check: bool = True):
        """Batch-mean loss and its gradients.

        Parameters
        ----------
        x : (B, *input_shape) array in the model's value range
        y : (B,) integer array of class labels, for conditional models (ignored by the others)
        eps : (B, Z) array, optional
            The noise of stochastic models (the reparameterization noise of a VAE); drawn from
            ``rng`` when not given.
        rng : np.random.Generator, optional
        target : (B, *input_shape) array, optional
            What to reconstruct, when it is not ``x`` itself (paired training).
        check : bool
            Check the inputs (shapes, dtypes, finiteness, range). The trainer checks whole arrays
            once and passes False.

        Returns
        -------
        terms : LossTerms
            ``total = recon + weight * kl``, per example (nats for the likelihood models).
        grads : dict of name -> array
            Gradients of ``terms.total``, keyed like :meth:`state_dict` (views; overwritten by the next call).
        """
        if check:
            x = self.check_input(x)
            y = self.check_labels(y, len(x))
            target = self.check_target(target, x)
            if eps is not None:
                eps = self.check_noise(x, eps)
            elif rng is not None:
                check_generator(rng)
            elif self.needs_noise:
                raise ValueError("pass eps (B, Z) or rng (an np.random.Generator) to draw it")
        recon, reg = self.forward(x, y, eps=eps, rng=rng, target=target)
        batch = x.shape[0]
        weight = self.reg_weight
        self.backward(self._row_scale(batch, 1.0, "drecon"), self._row_scale(batch, weight, "dreg"))
        r, k = float(recon.mean(dtype=np.float64)), float(reg.mean(dtype=np.float64))
        return LossTerms(r + weight * k, r, k), self.gradients()

    # -- inference

    def _batched(self, fn, *arrays, batch_size: int = 1000):
        """Apply ``fn`` to slices of the arrays (None passes through) and stack the (copied) results."""
        n = len(arrays[0])
        starts = range(0, n, batch_size) if n else [0]
        out = []
        for i in starts:  # copy each result at once: the next batch of the same size reuses its buffers
            result = fn(*(None if a is None else a[i : i + batch_size] for a in arrays))
            out.append(tuple(map(np.array, result)) if isinstance(result, tuple) else np.array(result))
        if isinstance(out[0], tuple):
            return tuple(np.concatenate([o[k] for o in out]) for k in range(len(out[0])))
        return np.concatenate(out)

    def check_codes(self, z) -> np.ndarray:
        z = np.asarray(z, dtype=self.dtype)
        if z.ndim != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"expected z of shape (N, {self.config.latent_dim}), got {z.shape}")
        return z

    def codes(self, x, y=None, batch_size: int = 1000) -> np.ndarray:
        """The code of each input (N, Z): the encoder's output (the posterior mean for a VAE)."""
        return self.encode(x, y, batch_size)

    def reconstruct(self, x, y=None, batch_size: int = 1000) -> np.ndarray:
        """Decode the code of each input: (N, *input_shape) -> (N, *input_shape)."""
        y = self.check_labels(y, len(np.asarray(x)))
        return self.decode(self.codes(x, y, batch_size), y, batch_size)

    def prior_codes(self, n: int, rng: np.random.Generator, y=None) -> np.ndarray:
        """n codes (n, Z) to decode as samples: N(0, I) unless the model has a prior of its own."""
        return rng.standard_normal((n, self.config.latent_dim), dtype=self.dtype)

    def sample_labels(self, n: int, y=None):
        """The labels of n samples (None for unconditional models)."""
        return None

    def sample(self, n: int, rng: np.random.Generator | None = None, y=None) -> np.ndarray:
        """Decode n codes drawn from the prior: (n, *input_shape) means of p(x | z).

        ``rng`` defaults to ``np.random.default_rng(0)`` (:data:`DEFAULT_SEED`): the same samples on
        every call. ``y`` conditions a conditional model's samples (see :class:`Conditional`); others
        ignore it.
        """
        n, rng = _check_count(n), generator_or_default(rng)
        y = self.sample_labels(n, y)
        return self.decode(self.prior_codes(n, rng, y), y)

    def evaluate(self, x, y=None, rng=None, *, target=None, batch_size: int = 1000) -> LossTerms:
        """Mean loss (one noise draw per example), reconstruction and regulariser over a whole set.

        ``x`` is read as every method reads it (:meth:`check_input`: uint8 pixels scaled, rows of the
        model's size viewed in its shape); ``rng`` defaults to ``np.random.default_rng(0)``
        (:data:`DEFAULT_SEED`), so the same call gives the same number.
        """
        x = self.check_input(x)
        y = self.check_labels(y, len(x))
        target = self.check_target(target, x)
        rng = generator_or_default(rng)
        recon = reg = 0.0
        totals = np.empty(len(x))  # per example, for the standard error
        for i in range(0, len(x), batch_size):
            rows = slice(i, i + batch_size)
            r, k = self.forward(x[rows], None if y is None else y[rows], rng=rng,
                                target=None if target is None else target[rows])
            recon += float(r.sum(dtype=np.float64))
            reg += float(k.sum(dtype=np.float64))
            totals[rows] = r.astype(np.float64) + self.eval_weight * k.astype(np.float64)
        recon, reg = recon / len(x), reg / len(x)
        se = float(totals.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
        return LossTerms(recon + self.eval_weight * reg, recon, reg, se)

    @property
    def loss_name(self) -> str:
        return "this loss"

    @property
    def kl_weight(self) -> float:
        """:attr:`reg_weight` under its name from the VAE-only days (read and set)."""
        return self.reg_weight

    @kl_weight.setter
    def kl_weight(self, value: float) -> None:
        self.reg_weight = value

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"{type(self).__name__}({fields}, dtype={self.dtype.name}, parameters={self.num_parameters:,})"


class GaussianLatent:
    """A model whose q(z | x) is a diagonal Gaussian N(mu, diag exp(logvar)) and whose regulariser is
    KL(q(z|x) || p(z)): ``encode`` returns ``(mu, logvar)``, ``prior(n, y)`` the prior's parameters,
    and ``reg_weight`` (beta, annealed by KL warm-up) weights the KL in training."""


class StandardNormalPrior:
    """The prior p(z) is the fixed N(0, I): log p(z) needs nothing but z."""


class Denoising:
    """A model that corrupts its input before encoding it and learns to reconstruct the clean input:
    ``corrupt(x, rng)`` returns the corrupted copy (B, *input_shape) that it encodes in training. Its
    pictures show the corrupted input, the output and the clean original."""


class Conditional:
    """A model of p(x | y): every method that takes images also takes their integer labels y (B,)
    with values in [0, num_classes)."""

    num_classes: int
