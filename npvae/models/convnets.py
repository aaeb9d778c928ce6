"""The convolutional presets: the write-ups' conv autoencoders and their convolutional VAE.

Each preset is a model class of its own (its CLI name is ``kind``) that builds the write-up's layer
stacks from the image shape; the stacks are ordinary :mod:`npvae.layers` (Conv2d, MaxPool2d,
Upsample2d, ConvTranspose2d, ...), so the model's spec stores them and a checkpoint rebuilds them
without this module's builders.

Images reach a model the way the data path delivers them: MNIST rows (B, 784), images (B, H, W) or
(B, 1, H, W). The encoder starts with a Reshape to (1, H, W) and the decoder ends with a Reshape
back, so the pictures, the trainer and the checks see the data's own shape.

=================  ===========================================================================
``conv-dae``       denoising write-up: Conv 64, 32, 16 (3x3 same ReLU) each + MaxPool 2 same
                   (28 -> 14 -> 7 -> 4); Conv 16 + Up 2, Conv 32 + Up 2, Conv 64 3x3 valid + Up 2,
                   Conv 1 3x3 same sigmoid; squared error, salt-and-pepper noise
``conv-vae``       Keras write-up: Conv 32 same; Conv 64 same stride 2; Conv 64; Conv 64 (3x3
                   ReLU); Flatten; Dense 32 ReLU; heads; latent 2; Dense 14*14*64 ReLU, Reshape,
                   ConvTranspose 32 3x3 stride 2 same ReLU, Conv 1 3x3 same (Bernoulli logits)
``conv-ae``        PyTorch write-up: Conv(1,16,3,s3,p1) ReLU MaxPool(2,2) Conv(16,8,3,s2,p1) ReLU
                   MaxPool(2,1); ConvT(8,16,3,s2) ReLU ConvT(16,8,5,s3,p1) ReLU ConvT(8,1,2,s2,p1)
                   Tanh; squared error on [-1, 1]
``conv-doc-dae``   document cleaning: Conv 64 same ReLU, MaxPool 2 same; Conv 64 same ReLU, Up 2,
                   Conv 1 same sigmoid; squared error; any even image size; (noisy, clean) pairs
=================  ===========================================================================

The Keras VAE samples ``z = mu + exp(h) eps`` (h its second head, a log sigma) while its KL reads
the same h as a log-variance: the two halves of its loss disagree about what h is. Here the
``parameterization`` picks one reading and uses it in both: ``"logvar"`` (default, h = log sigma^2)
or ``"log_sigma"`` (h = log sigma, so logvar = 2 h in the sampler and the KL alike); the second
head's state-dict key says which (``logvar`` or ``log_sigma``).

The write-ups' sigmoid output with a binary cross-entropy is computed here as BCE from logits (the
same function, finite for every logit); the model's means (``decode``) are the sigmoid.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..layers import (Conv2d, ConvTranspose2d, Dense, Flatten, GaussianHeads, MaxPool2d, Reshape, Sequential,
                      Upsample2d)
from ..registry import option
from .autoencoders import Autoencoder, AutoencoderConfig, DenoisingAutoencoder, DenoisingAutoencoderConfig
from .vae import VAE, VAEConfig, _positive, resolve_input_shape

PARAMETERIZATIONS = ("logvar", "log_sigma")


def image_shape(input_shape, kind: str) -> tuple[int, int, int]:
    """The (1, H, W) image behind a data shape: (D,) with D a square, (H, W), or (1, H, W)."""
    shape = tuple(input_shape)
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side != shape[0]:
            raise ValueError(f"{kind} takes square images as rows (B, H*H) or images (B, H, W); got rows of "
                             f"{shape[0]} values, not a square")
        return (1, side, side)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3 and shape[0] == 1:
        return shape
    raise ValueError(f"{kind} takes single-channel images (B, H, W) or (B, 1, H, W), got (B, {', '.join(map(str, shape))})")


def _wrap(kind: str, input_shape, encoder: list, decoder: list, code=None):
    """Prepend the Reshape to (1, H, W) and append the Reshape back to the data's shape, after checking
    that the decoder, fed ``code`` (default: the encoder's output), gives back the images' shape."""
    image = image_shape(input_shape, kind)
    if code is None:
        code = Sequential([Reshape(image), *encoder]).output_shape(tuple(input_shape))
    out = Sequential(list(decoder)).output_shape(code)
    if tuple(out) != image:
        raise ValueError(f"{kind}: the write-up's layers turn images of shape {image} into {tuple(out)}; they fit "
                         "28x28 images (see npvae.models.convnets for each preset's sizes)")
    return Sequential([Reshape(image), *encoder]), Sequential([*decoder, Reshape(tuple(input_shape))])


def conv_dae_stacks(input_shape, activation: str = "relu"):
    """The denoising write-up's conv autoencoder (28x28 images: code 16 x 4 x 4, flattened)."""
    a = activation
    encoder = [Conv2d(1, 64, 3, padding="same", activation=a), MaxPool2d(2, padding="same"),
               Conv2d(64, 32, 3, padding="same", activation=a), MaxPool2d(2, padding="same"),
               Conv2d(32, 16, 3, padding="same", activation=a), MaxPool2d(2, padding="same")]
    stack = Sequential([Reshape(image_shape(input_shape, "conv-dae")), *encoder])
    code = stack.output_shape(tuple(input_shape))
    decoder = [Reshape(code),
               Conv2d(16, 16, 3, padding="same", activation=a), Upsample2d(2),
               Conv2d(16, 32, 3, padding="same", activation=a), Upsample2d(2),
               Conv2d(32, 64, 3, padding="valid", activation=a), Upsample2d(2),
               Conv2d(64, 1, 3, padding="same", activation="sigmoid")]
    return _wrap("conv-dae", input_shape, [*encoder, Flatten()], decoder)


def conv_ae_stacks(input_shape, activation: str = "relu"):
    """The PyTorch write-up's conv autoencoder (28x28 images: code 8 x 2 x 2, flattened)."""
    a = activation
    encoder = [Conv2d(1, 16, 3, stride=3, padding=1, activation=a), MaxPool2d(2, stride=2),
               Conv2d(16, 8, 3, stride=2, padding=1, activation=a), MaxPool2d(2, stride=1)]
    code = Sequential([Reshape(image_shape(input_shape, "conv-ae")), *encoder]).output_shape(tuple(input_shape))
    decoder = [Reshape(code),
               ConvTranspose2d(8, 16, 3, stride=2, activation=a),
               ConvTranspose2d(16, 8, 5, stride=3, padding=1, activation=a),
               ConvTranspose2d(8, 1, 2, stride=2, padding=1, activation="tanh")]
    return _wrap("conv-ae", input_shape, [*encoder, Flatten()], decoder)


def conv_doc_dae_stacks(input_shape, activation: str = "relu"):
    """The document-cleaning autoencoder, for images of any even height and width."""
    _, h, w = image_shape(input_shape, "conv-doc-dae")
    if h % 2 or w % 2:
        raise ValueError(f"conv-doc-dae pools by 2 and upsamples by 2, so it needs an even height and width; "
                         f"got images of {h}x{w} (crop or pad them by one pixel)")
    a = activation
    encoder = [Conv2d(1, 64, 3, padding="same", activation=a), MaxPool2d(2, padding="same")]
    decoder = [Reshape((64, h // 2, w // 2)), Conv2d(64, 64, 3, padding="same", activation=a), Upsample2d(2),
               Conv2d(64, 1, 3, padding="same", activation="sigmoid")]
    return _wrap("conv-doc-dae", input_shape, [*encoder, Flatten()], decoder)


def conv_vae_stacks(input_shape, latent_dim: int, activation: str = "relu", output_activation: str = "identity"):
    """The Keras write-up's convolutional VAE: the encoder up to its Dense 32, and the decoder."""
    a = activation
    image = image_shape(input_shape, "conv-vae")
    encoder = [Conv2d(1, 32, 3, padding="same", activation=a),
               Conv2d(32, 64, 3, stride=2, padding="same", activation=a),
               Conv2d(64, 64, 3, padding="same", activation=a),
               Conv2d(64, 64, 3, padding="same", activation=a), Flatten()]
    features = Sequential([Reshape(image), *encoder]).output_shape(tuple(input_shape))[0]
    _, h, w = image
    if h % 2 or w % 2:
        raise ValueError(f"conv-vae halves the image with a stride-2 convolution and doubles it back, so it needs "
                         f"an even height and width; got images of {h}x{w}")
    decoder = [Dense(latent_dim, (h // 2) * (w // 2) * 64, activation=a), Reshape((64, h // 2, w // 2)),
               ConvTranspose2d(64, 32, 3, stride=2, padding="same", activation=a),
               Conv2d(32, 1, 3, padding="same", activation=output_activation)]
    return _wrap("conv-vae", input_shape, [*encoder, Dense(features, 32, activation=a)], decoder, (latent_dim,))


# ----------------------------------------------------------------------------- the VAE


# The conv presets' layers are the write-ups': widths and the output layer do not apply (the command line says why).
_NO_WIDTHS = "sets MLP widths; --model {preset} has the write-up's convolutional layers"
_OWN_OUTPUT = "sets an MLP decoder's output; --model {preset}'s output layer is the write-up's"


@dataclass
class ConvVAEConfig(VAEConfig):
    latent_dim: int = 2
    hidden: tuple[int, ...] | None = option(None, "the architecture is the preset's (its layers are in the spec)",
                                            cli=False, refusal=_NO_WIDTHS)
    parameterization: str = option("logvar", "the second head is log sigma^2 (logvar) or log sigma (log_sigma), "
                                   "read the same way by the sampler and the KL", choices=PARAMETERIZATIONS)


@dataclass
class ConvAutoencoderConfig(AutoencoderConfig):
    hidden: tuple[int, ...] | None = option(None, "the architecture is the preset's (its layers are in the spec)",
                                            cli=False, refusal=_NO_WIDTHS)
    output_activation: str = option("sigmoid", "the write-up's output layer", cli=False, refusal=_OWN_OUTPUT)
    latent_dim: int | None = option(None, "code size: the encoder's output (a latent size that differs is refused)")


@dataclass
class ConvDenoisingAutoencoderConfig(DenoisingAutoencoderConfig):
    hidden: tuple[int, ...] | None = option(None, "the architecture is the preset's (its layers are in the spec)",
                                            cli=False, refusal=_NO_WIDTHS)
    output_activation: str = option("sigmoid", "the write-up's output layer", cli=False, refusal=_OWN_OUTPUT)
    latent_dim: int | None = option(None, "code size: the encoder's output (a latent size that differs is refused)")


class ConvVAE(VAE):
    """The Keras write-up's convolutional VAE (``--model conv-vae``), consistent in its parameterization.

    Parameters
    ----------
    input_dim : int
        D (square single-channel images as rows), unless ``input_shape`` is given.
    latent_dim : int
        Z, 2 in the write-up (the 2-D manifold picture).
    activation : str
        The hidden layers' activation (ReLU).
    likelihood : str
        ``bernoulli`` (the write-up's BCE), ``gaussian`` or ``continuous_bernoulli``.
    beta : float
        KL weight (1 gives the ELBO). The write-up's ``5e-4 * mean_j(...)`` beside a BCE averaged over
        784 pixels is ``beta = 784 * 5e-4 * 2 / Z = 0.392`` at Z = 2 in npvae's per-image sums (the
        derivation is in :mod:`npvae.recipes`, recipe ``keras-conv-vae``), not 5e-4.
    parameterization : {"logvar", "log_sigma"}
        See the module docstring.
    logvar_bounds : (lo, hi) or None
        Clamp the log-variance (after the log-sigma doubling).
    input_shape : tuple of int, optional
        (D,), (H, W) or (1, H, W) with H and W even.
    encoder, decoder : Sequential, optional
        Rebuilding from a spec; by default the write-up's stacks.
    """

    kind = "conv-vae"
    help = "the Keras write-up's convolutional VAE (2-D latent)"
    config_class = ConvVAEConfig

    def __init__(self, input_dim: int = 784, hidden=None, latent_dim: int = 2, activation: str = "relu",
                 likelihood: str = "bernoulli", beta: float = 1.0, alpha: float = 0.01, logvar_bounds=None,
                 parameterization: str = "logvar", dtype=np.float32, seed: int = 0, *, encoder=None, decoder=None,
                 input_shape=None):
        if hidden is not None:
            raise ValueError("conv-vae's layers are the write-up's; hidden widths do not apply (use --latent-dim)")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}: expected one of {', '.join(PARAMETERIZATIONS)}")
        self.input_shape = resolve_input_shape(input_dim, input_shape)
        bounds = None if logvar_bounds is None else (float(logvar_bounds[0]), float(logvar_bounds[1]))
        self.config = ConvVAEConfig(self.input_dim, None, _positive(latent_dim, "latent_dim"), activation, likelihood,
                                    float(beta), float(alpha), bounds, parameterization)
        self._validate_config()
        self.logvar_scale = 2.0 if parameterization == "log_sigma" else 1.0
        self.reg_weight = self.config.beta
        if encoder is None and decoder is None:
            encoder, decoder = conv_vae_stacks(self.input_shape, self.config.latent_dim, activation,
                                               self.likelihood.output_activation)
        encoder, decoder = self._stacks(encoder, decoder)
        self._build(self._parts(encoder, decoder), dtype, seed)

    def _parts(self, encoder, decoder) -> dict:
        self.encoder, self.decoder = encoder, decoder
        names = ("mu", "log_sigma" if self.config.parameterization == "log_sigma" else "logvar")
        self.heads = GaussianHeads(self._features, self.config.latent_dim, names=names)
        return {"encoder": encoder, "heads": self.heads, "decoder": decoder}


# ----------------------------------------------------------------------------- the autoencoders


def _code_dim(encoder, input_shape) -> int:
    return encoder.output_shape(tuple(input_shape))[0]


class _ConvAutoencoderMixin:
    """Builds a conv preset's stacks (``builder``) and passes them to the autoencoder as its own layers."""

    builder = staticmethod(conv_dae_stacks)
    default_activation = "sigmoid"
    default_range = (0.0, 1.0)

    def _make_config(self, *args):
        return self.config_class(**dataclasses.asdict(super()._make_config(*args)))

    def _preset_stacks(self, input_dim, input_shape, latent_dim, activation, encoder, decoder, hidden,
                       code_activation="identity"):
        if hidden is not None:
            raise ValueError(f"{self.kind}'s layers are the write-up's; hidden widths do not apply")
        if code_activation != "identity":  # the config field of the dense autoencoders; the code here is a conv map's
            raise ValueError(f"{self.kind}'s code is its encoder's output; code_activation {code_activation!r} "
                             "does not apply")
        shape = resolve_input_shape(input_dim, input_shape)
        if encoder is None and decoder is None:
            encoder, decoder = self.builder(shape, activation)
        code = _code_dim(encoder, shape) if encoder is not None else None
        if latent_dim is not None and code is not None and latent_dim != code:
            raise ValueError(f"{self.kind}'s code is its encoder's output ({code} values for images of shape "
                             f"{tuple(shape)}); a latent_dim of {latent_dim} does not apply")
        return shape, code, encoder, decoder


class ConvAutoencoder(_ConvAutoencoderMixin, Autoencoder):
    """The PyTorch write-up's conv autoencoder (``--model conv-ae``): squared error on images in [-1, 1]."""

    kind = "conv-ae"
    help = "the PyTorch write-up's convolutional autoencoder, images in [-1, 1]"
    config_class = ConvAutoencoderConfig
    builder = staticmethod(conv_ae_stacks)

    def __init__(self, input_dim=784, hidden=None, latent_dim=None, activation="relu", output_activation="tanh",
                 value_range=(-1.0, 1.0), alpha=0.01, dtype=np.float32, seed=0, *, encoder=None, decoder=None,
                 input_shape=None, code_activation="identity"):
        shape, code, encoder, decoder = self._preset_stacks(input_dim, input_shape, latent_dim, activation, encoder,
                                                            decoder, hidden, code_activation)
        super().__init__(input_dim, None, code, activation, output_activation, value_range, alpha, dtype, seed,
                         encoder=encoder, decoder=decoder, input_shape=shape)


class ConvDocumentDAE(_ConvAutoencoderMixin, Autoencoder):
    """The document-cleaning conv autoencoder (``--model conv-doc-dae``), trained on (noisy, clean)
    pairs of pages of any even size; squared error on [0, 1]."""

    kind = "conv-doc-dae"
    help = "the document-cleaning convolutional autoencoder, trained on (noisy, clean) page pairs"
    config_class = ConvAutoencoderConfig
    builder = staticmethod(conv_doc_dae_stacks)
    train_defaults = {"batch_size": 16, "patience": 5, "lr": 1e-3}

    def __init__(self, input_dim=784, hidden=None, latent_dim=None, activation="relu", output_activation="sigmoid",
                 value_range=(0.0, 1.0), alpha=0.01, dtype=np.float32, seed=0, *, encoder=None, decoder=None,
                 input_shape=None, code_activation="identity"):
        shape, code, encoder, decoder = self._preset_stacks(input_dim, input_shape, latent_dim, activation, encoder,
                                                            decoder, hidden, code_activation)
        super().__init__(input_dim, None, code, activation, output_activation, value_range, alpha, dtype, seed,
                         encoder=encoder, decoder=decoder, input_shape=shape)


class ConvDenoisingAutoencoder(_ConvAutoencoderMixin, DenoisingAutoencoder):
    """The denoising write-up's conv autoencoder (``--model conv-dae``): salt-and-pepper noise,
    squared error on [0, 1]; the write-up's batch 2048 and patience 10 are its training defaults."""

    kind = "conv-dae"
    help = "the denoising write-up's convolutional autoencoder (salt-and-pepper noise)"
    config_class = ConvDenoisingAutoencoderConfig
    builder = staticmethod(conv_dae_stacks)
    train_defaults = {"batch_size": 2048, "patience": 10}

    def __init__(self, input_dim=784, hidden=None, latent_dim=None, activation="relu", output_activation="sigmoid",
                 value_range=(0.0, 1.0), alpha=0.01, noise="salt_pepper", noise_level=0.2, dtype=np.float32, seed=0, *,
                 encoder=None, decoder=None, input_shape=None, code_activation="identity", noise_draws="fresh",
                 noise_seed=0):
        shape, code, encoder, decoder = self._preset_stacks(input_dim, input_shape, latent_dim, activation, encoder,
                                                            decoder, hidden, code_activation)
        super().__init__(input_dim, None, code, activation, output_activation, value_range, alpha, dtype, seed,
                         encoder=encoder, decoder=decoder, input_shape=shape, noise=noise, noise_level=noise_level,
                         noise_draws=noise_draws, noise_seed=noise_seed)


CONV_MODELS = (ConvVAE, ConvDenoisingAutoencoder, ConvAutoencoder, ConvDocumentDAE)
