"""Deterministic autoencoders: the plain autoencoder, the denoising autoencoder and the poor man's VAE.

Each is an encoder and a decoder :class:`~npvae.layers.Sequential` and a squared-error loss; the
denoising autoencoder corrupts its input first, the poor man's VAE adds noise to the code and
penalises the code's distance to the origin.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

from .. import ops, penalties
from ..layers import Sequential, mlp
from ..registry import option
from .base import Denoising, LossNames, Model, check_generator
from .likelihoods import SquaredError
from .vae import _positive, _sizes, check_stack, input_layers, output_layers, resolve_input_shape


NOISES = ("salt_pepper", "gaussian")  # the denoising autoencoders' corruptions
NOISE_DRAWS = ("fresh", "once")  # a new corruption of every image each time it is seen, or one fixed copy per image
CODE_PENALTIES = ("per_image", "batch")  # the poor man's VAE's norm: of each code, or of the batch's codes


@dataclass
class AutoencoderConfig:
    input_dim: int = option(784, "D, values per example", cli=False)
    hidden: tuple[int, ...] | None = option(
        (128, 64, 12), "encoder widths, e.g. --hidden 512 256; the decoder mirrors them", nargs="+")
    latent_dim: int = option(3, "code size Z")
    activation: str = option("relu", f"hidden activation: {', '.join(ops.ACTIVATIONS)}")
    output_activation: str = option("tanh", "the decoder's output activation: tanh for data scaled to [-1, 1], "
                                    "identity for a linear autoencoder (with --activation identity)")
    value_range: tuple[float, float] = option((-1.0, 1.0), "the data's range (and the DAE's clip range)", cli=False)
    alpha: float = option(0.01, "LeakyReLU slope", cli=False)
    code_activation: str = option("identity", "the code layer's activation (sigmoid codes for the sparse and "
                                  "contractive AEs)", cli=False)


class Autoencoder(Model):
    """Deterministic MLP autoencoder, loss = squared error summed over pixels, mean over the batch.

    Default: 784-128-64-12-3 ReLU encoder, mirrored decoder with a tanh output, data in [-1, 1].
    The baseline the VAE improves on: its code space has no prior to sample from. ``encoder`` and
    ``decoder`` may be your own stacks (x (B, *input_shape) -> code (B, Z) -> (B, *input_shape)).
    """

    kind = "ae"
    help = "autoencoder: MLP encoder and decoder, squared error"
    config_class = AutoencoderConfig
    loss_names = LossNames("squared error", "squared error")  # summed over pixels; an error, not a density

    def __init__(self, input_dim=784, hidden=(128, 64, 12), latent_dim=3, activation="relu", output_activation="tanh",
                 value_range=(-1.0, 1.0), alpha=0.01, dtype=np.float32, seed=0, *, encoder=None, decoder=None,
                 input_shape=None, code_activation="identity"):
        self.input_shape = resolve_input_shape(input_dim, input_shape)
        custom = encoder is not None or decoder is not None
        self.config = self._make_config(self.input_dim, None if custom else _sizes(hidden, "hidden"),
                                        _positive(latent_dim, "latent_dim"), activation, output_activation,
                                        tuple(float(v) for v in value_range), float(alpha), code_activation)
        c = self.config
        for act in (c.activation, c.output_activation, c.code_activation):
            ops.ACTIVATIONS.check(act)
        if not (len(c.value_range) == 2 and c.value_range[0] < c.value_range[1]):
            raise ValueError(f"expected value_range (lo, hi) with lo < hi, got {c.value_range}")
        self.value_range = c.value_range
        self.loss = SquaredError()
        if (encoder is None) != (decoder is None):
            raise ValueError("pass both encoder and decoder (or neither, to build them from hidden)")
        if encoder is None:
            encoder = Sequential(input_layers(self.input_shape)
                                 + list(mlp([self.input_dim, *c.hidden, c.latent_dim], c.activation, c.code_activation, c.alpha)))
            decoder = Sequential(list(mlp([c.latent_dim, *reversed(c.hidden), self.input_dim], c.activation,
                                          c.output_activation, c.alpha)) + output_layers(self.input_shape))
        check_stack(encoder, self.input_shape, (c.latent_dim,), "encoder")
        check_stack(decoder, (c.latent_dim,), self.input_shape, "decoder")
        self.encoder, self.decoder = encoder, decoder
        self._build({"encoder": encoder, "decoder": decoder}, dtype, seed)

    def _make_config(self, *args):
        return AutoencoderConfig(*args)

    @property
    def loss_name(self) -> str:
        return "squared error"

    # -- hooks of the variants

    def corrupt_input(self, x: np.ndarray, rng) -> np.ndarray:
        """The encoder's input for x: x itself (the denoising autoencoder corrupts it)."""
        return x

    def _code(self, x: np.ndarray, eps, rng) -> np.ndarray:
        return self.encoder.forward(x)

    def _code_backward(self, dcode: np.ndarray) -> None:
        self.encoder.backward(dcode, need_dx=False)

    def _regulariser(self, code: np.ndarray) -> np.ndarray:
        zeros = self.workspace.get(code.shape[0], "reg", (code.shape[0],))
        zeros.fill(0)
        return zeros

    def _add_regulariser_grad(self, dreg, dcode) -> None:
        pass

    # -- the loss

    def forward(self, x, y=None, eps=None, rng=None, target=None):
        """Per-example reconstruction error (B,) and regulariser (B,) (zeros for a plain AE). Inputs unchecked."""
        code = self._code(self.corrupt_input(x, rng), eps, rng)
        out = self.decoder.forward(code)
        batch = out.shape[0]
        target = x if target is None else target
        recon, self._loss_cache = self.loss.forward(out.reshape(batch, -1), target.reshape(batch, -1),
                                                    lambda name, shape: self.workspace.get(batch, name, shape))
        return recon, self._regulariser(code)

    def backward(self, drecon: np.ndarray, dreg: np.ndarray) -> None:
        """Fill ``params.grad`` with d/dtheta of sum_i drecon[i] recon_i + dreg[i] reg_i."""
        dcode = self._decoder_backward(self.loss, drecon, self._loss_cache)
        self._add_regulariser_grad(dreg, dcode)
        self._code_backward(dcode)

    # -- inference

    def encode(self, x, y=None, batch_size: int = 1000) -> np.ndarray:
        """Codes (N, Z) (copies)."""
        x = self.check_input(x)
        return self._batched(lambda xb, yb: self.encoder.forward(xb), x, None, batch_size=batch_size)

    def decode(self, z, y=None, batch_size: int = 1000) -> np.ndarray:
        """Decoder outputs (N, *input_shape) for codes z (N, Z)."""
        z = self.check_codes(z)
        return self._batched(lambda zb, yb: self.decoder.forward(zb), z, None, batch_size=batch_size)

    def sample(self, n: int, rng: np.random.Generator | None = None, y=None) -> np.ndarray:
        """Decode codes drawn from a Gaussian fitted to nothing: N(0, I). AEs have no prior, which
        is exactly why their samples look poor; provided for the side-by-side picture."""
        return super().sample(n, rng, y)


@dataclass
class DenoisingAutoencoderConfig(AutoencoderConfig):
    noise: str = option("salt_pepper", "corruption: salt_pepper (pixels set to the range's ends) or gaussian",
                        choices=NOISES)
    noise_level: float = option(0.2, "fraction of pixels hit (salt_pepper) or noise std (gaussian)")
    noise_draws: str = option("fresh", "fresh: a new corruption each time an image is seen; once: one fixed noisy "
                              "copy per image, drawn from --noise-seed and the image itself (the same copy every "
                              "epoch, on resuming and in evaluate: the write-up's corrupt-once pass)",
                              choices=NOISE_DRAWS)
    noise_seed: int = option(0, "once: seeds the fixed noisy copies", bounds=(0, 2**63 - 1))


class DenoisingAutoencoder(Autoencoder, Denoising):
    """Autoencoder trained to undo corruption: the loss compares the reconstruction of the corrupted
    input with the clean input. Each batch is corrupted afresh (``noise_draws="fresh"``), or each image
    has one fixed noisy copy (``"once"``): its corruption is drawn from a generator seeded by
    ``(noise_seed, a hash of the image's float32 values)``, so the copy is the same every epoch, after a
    resume and when evaluating, without storing it."""

    kind = "dae"
    help = "denoising autoencoder: reconstructs clean images from corrupted ones"
    config_class = DenoisingAutoencoderConfig

    def __init__(self, *args, noise: str = "salt_pepper", noise_level: float = 0.2, noise_draws: str = "fresh",
                 noise_seed: int = 0, **kwargs):
        if noise not in NOISES:
            raise ValueError(f"unknown noise {noise!r}: expected salt_pepper or gaussian")
        if not 0 <= noise_level <= (1 if noise == "salt_pepper" else np.inf):
            raise ValueError(f"expected noise_level in [0, 1] for salt_pepper or >= 0 for gaussian, got {noise_level}")
        if noise_draws not in NOISE_DRAWS:
            raise ValueError(f"unknown noise_draws {noise_draws!r}: expected one of {', '.join(NOISE_DRAWS)}")
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, (int, np.integer)) or noise_seed < 0:
            raise ValueError(f"expected noise_seed an integer >= 0, got {noise_seed!r}")
        self._noise = (noise, float(noise_level), noise_draws, int(noise_seed))
        super().__init__(*args, **kwargs)

    def _make_config(self, *args):
        base = super()._make_config(*args)
        noise, level, draws, seed = self._noise
        return DenoisingAutoencoderConfig(**dataclasses.asdict(base), noise=noise, noise_level=level,
                                          noise_draws=draws, noise_seed=seed)

    def corrupt(self, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """A corrupted copy of x (B, ...), clipped to the value range; ``rng`` is unused (and may be None)
        when every image has its fixed copy (``noise_draws="once"``)."""
        if self.config.noise_draws == "once":
            out = np.empty_like(x)
            for i, row in enumerate(x):  # drawn in float64: the copy does not depend on the model's dtype
                out[i] = self._draw_corruption(row.astype(np.float64), self._image_generator(row))
            return out
        if rng is None:
            raise ValueError("a denoising autoencoder needs rng (an np.random.Generator) to corrupt its input")
        return self._draw_corruption(x, check_generator(rng))

    def _image_generator(self, image: np.ndarray) -> np.random.Generator:
        """The generator of one image's fixed corruption: seeded by noise_seed and the image's values (as
        float32, so a float64 model of the same data draws the same copies, to the dtype's rounding)."""
        values = np.ascontiguousarray(image, dtype=np.float32).tobytes()
        key = int.from_bytes(hashlib.blake2b(values, digest_size=8).digest(), "little")
        return np.random.default_rng([self.config.noise_seed, key])

    def _draw_corruption(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.config.value_range
        if self.config.noise == "gaussian":
            noisy = x + rng.standard_normal(x.shape, dtype=x.dtype) * x.dtype.type(self.config.noise_level)
            return np.clip(noisy, lo, hi, out=noisy)
        hit = rng.random(x.shape, dtype=x.dtype) < self.config.noise_level
        salt = rng.random(x.shape, dtype=x.dtype) < 0.5
        return np.where(hit, np.where(salt, x.dtype.type(hi), x.dtype.type(lo)), x)

    corrupt_input = corrupt


@dataclass
class PoorMansVAEConfig(AutoencoderConfig):
    hidden: tuple[int, ...] | None = (392,)
    latent_dim: int = 20
    activation: str = "sigmoid"
    output_activation: str = "sigmoid"
    value_range: tuple[float, float] = (0.0, 1.0)
    noise_std: float = option(1.0, "std of the noise added to the code", cli=False)
    code_penalty: str = option("per_image", "per_image: the norm of each image's code; batch: one norm of the whole "
                               "batch's codes, ||Z||_F (the write-up's z.pow(2).sum().sqrt()), shared out over the "
                               "batch, about sqrt(B) times weaker", choices=CODE_PENALTIES)


class PoorMansVAE(Autoencoder):
    """The "poor man's VAE": a deterministic encoder whose code gets unit Gaussian noise,
    ``z = h + eps``, and a penalty on the code's distance to the origin in place of the KL:

    ``loss = sum_j (x_hat_j - x_j)^2 + ||z||_2`` per example, mean over the batch.

    With ``code_penalty="batch"`` the penalty is the write-up's, one norm of the batch's codes Z (B, Z):
    each example's term is ``||Z||_F / B``, so that the batch mean of the loss is
    ``(sum_i sum_j (x_hat_ij - x_ij)^2 + ||Z||_F) / B``, the write-up's batch sum divided by B. A statistic
    of the batch: :meth:`evaluate` computes it over batches of its ``batch_size``.

    Default: sigmoid MLP 784-392-Z-392-784 (linear code layer, sigmoid output), data in [0, 1].
    """

    kind = "poor"
    help = "poor man's VAE: unit Gaussian noise on a deterministic code, its norm penalised"
    config_class = PoorMansVAEConfig
    needs_noise = True
    loss_names = LossNames("squared error + code norm", "squared error", "code norm")
    prior_name = "N(0, I)"  # where its unit noise and the norm penalty pull the codes

    def __init__(self, input_dim=784, hidden=(392,), latent_dim=20, activation="sigmoid", output_activation="sigmoid",
                 value_range=(0.0, 1.0), alpha=0.01, noise_std=1.0, dtype=np.float32, seed=0, *,
                 code_penalty="per_image", **kwargs):
        if code_penalty not in CODE_PENALTIES:
            raise ValueError(f"unknown code_penalty {code_penalty!r}: expected one of {', '.join(CODE_PENALTIES)}")
        self._noise_std = float(noise_std)
        self._code_penalty = code_penalty
        super().__init__(input_dim, hidden, latent_dim, activation, output_activation, value_range, alpha, dtype, seed,
                         **kwargs)

    def _make_config(self, *args):
        base = super()._make_config(*args)
        return PoorMansVAEConfig(**dataclasses.asdict(base), noise_std=self._noise_std,
                                 code_penalty=self._code_penalty)

    def _code(self, x, eps, rng):
        eps = self._draw_eps(x.shape[0], eps, rng)
        h = self.encoder.forward(x)
        z, self._noise_cache = ops.add_noise_forward(h, eps, scale=self.config.noise_std)
        return z

    def _regulariser(self, z):
        if self.config.code_penalty == "per_image":
            norms, self._norm_cache = ops.l2_norm_forward(z, "none")
            return norms
        batch = z.shape[0]
        norm, self._norm_cache = penalties.batch_l2_norm_forward(z)
        rows = self.workspace.get(batch, "reg", (batch,))
        rows.fill(norm / batch)  # each example's share of the batch's norm
        return rows

    def _add_regulariser_grad(self, dreg, dz) -> None:
        if self.config.code_penalty == "per_image":
            dz += ops.l2_norm_backward(dreg, self._norm_cache)
            return
        batch = dz.shape[0]  # sum_i dreg_i * ||Z||_F / B
        dz += penalties.batch_l2_norm_backward(dreg.sum(dtype=np.float64) / batch, self._norm_cache)

    def _code_backward(self, dz) -> None:
        self.encoder.backward(ops.add_noise_backward(dz, self._noise_cache), need_dx=False)
