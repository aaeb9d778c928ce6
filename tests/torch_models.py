"""PyTorch reference models for the whole-model tests, written directly from the math.

Nothing here calls npvae's math: each reference re-states a model with ``F.linear``-style layers,
torch activations and losses, and lets autograd differentiate it. The references are
``nn.Module``s whose parameter names, order and shapes are exactly those of the matching npvae
model's ``state_dict()``, so ``ref.load_state_dict(to_torch(model.state_dict()), strict=True)``
needs no key mapping, and ``gradients(ref)`` is keyed like npvae's ``grads``.

Each reference's ``forward`` mirrors the npvae model's ``forward`` signature and returns the same
per-example terms ``(recon (B,), reg (B,))``; ``loss`` returns the batch-mean ``(total, recon, reg)``
of ``loss_and_grads``. The functional pieces (activations, likelihoods, KL) are public so that
references for other models (the conditional VAE) reuse them rather than re-derive them.

Usage::

    ref = reference_for(model)                       # float64, model's weights loaded strictly
    total, recon, kl = ref.loss(x, eps)              # tensors
    total.backward()
    grads = gradients(ref)                           # {"encoder.0.weight": ndarray, ...}
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from npvae import models

LOG_2PI = math.log(2 * math.pi)

# ----------------------------------------------------------------------------- building blocks


def torch_activation(name: str, alpha: float = 0.01) -> Callable[[Tensor], Tensor]:
    """The torch function for an npvae activation name (``alpha``: LeakyReLU's slope)."""
    functions = {
        "identity": lambda a: a,
        "relu": torch.relu,
        "leaky_relu": lambda a: F.leaky_relu(a, alpha),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        # Not F.softplus: its default threshold=20 returns a itself above 20, 2e-9 off the math.
        "softplus": lambda a: torch.logaddexp(a, torch.zeros_like(a)),
    }
    try:
        return functions[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}: expected one of {', '.join(functions)}") from None


def linears(sizes) -> nn.ModuleList:
    """``nn.Linear`` layers ``sizes[0] -> sizes[1] -> ...`` (empty for fewer than two sizes)."""
    return nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))


def mlp(x: Tensor, layers: nn.ModuleList, act: Callable, out_act: Callable) -> Tensor:
    """Apply ``layers``, ``act`` after each but the last, ``out_act`` after the last."""
    for k, layer in enumerate(layers):
        x = (out_act if k == len(layers) - 1 else act)(layer(x))
    return x


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """-log Bernoulli(x | sigmoid(logits)) summed over features: (B, D) -> (B,)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)


def gaussian_nll(mean: Tensor, x: Tensor) -> Tensor:
    """-log N(x | mean, I) summed over features: (B, D) -> (B,)."""
    return 0.5 * ((mean - x) ** 2).sum(1) + 0.5 * x.shape[1] * LOG_2PI


def cb_log_norm(logits: Tensor) -> Tensor:
    """Continuous-Bernoulli log-normaliser ``log C(l) = log(l / tanh(l/2))``, elementwise (B, D).

    Below ``|l| < 1e-4`` it is ``log 2 + l^2 / 12`` (next term ~1e-19): autograd's derivative of the
    closed form is a difference of two ~2/l terms there, and 0/0 at l = 0.
    """
    small = logits.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(logits), logits)
    return torch.where(small, math.log(2) + logits**2 / 12, torch.log(safe / torch.tanh(safe / 2)))


def continuous_bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """-log CB(x | logits) = BCE - log C, summed over features: (B, D) -> (B,)."""
    return bernoulli_nll(logits, x) - cb_log_norm(logits).sum(1)


def kl_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dimensions: (B, Z) -> (B,)."""
    return 0.5 * (mu**2 + torch.exp(logvar) - 1 - logvar).sum(1)


# What the decoder's last layer emits (logits, or a sigmoid mean) and the NLL that reads it.
DECODER_OUTPUT = {"bernoulli": "identity", "continuous_bernoulli": "identity", "gaussian": "sigmoid"}
NLL = {"bernoulli": bernoulli_nll, "continuous_bernoulli": continuous_bernoulli_nll, "gaussian": gaussian_nll}


# ----------------------------------------------------------------------------- models


class TorchVAE(nn.Module):
    """Gaussian VAE: encoder ``D -> hidden``, heads ``mu``/``logvar``, decoder ``Z -> reversed(hidden) -> D``;
    ``z = mu + exp(logvar / 2) * eps``; loss per example ``recon + beta * KL``.
    With ``logvar_bounds = (lo, hi)`` the logvar head is clamped into [lo, hi].

    Keys, in order: ``encoder.{i}``, ``mu``, ``logvar``, ``decoder.{i}``.
    """

    def __init__(self, input_dim=784, hidden=(400,), latent_dim=20, activation="relu", likelihood="bernoulli",
                 beta=1.0, alpha=0.01, logvar_bounds=None):
        super().__init__()
        hidden = tuple(hidden)
        width = hidden[-1] if hidden else input_dim
        self.encoder = linears([input_dim, *hidden])
        self.mu = nn.Linear(width, latent_dim)
        self.logvar = nn.Linear(width, latent_dim)
        self.decoder = linears([latent_dim, *reversed(hidden), input_dim])
        self.act = torch_activation(activation, alpha)
        self.out_act = torch_activation(DECODER_OUTPUT[likelihood])
        self.nll = NLL[likelihood]
        self.reg_weight = float(beta)
        self.logvar_bounds = logvar_bounds

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, D) -> mu (B, Z), logvar (B, Z)."""
        h = mlp(x, self.encoder, self.act, self.act)
        logvar = self.logvar(h)
        if self.logvar_bounds is not None:
            logvar = torch.clamp(logvar, *self.logvar_bounds)
        return self.mu(h), logvar

    def decode(self, z: Tensor) -> Tensor:
        """z (B, Z) -> the decoder's output (B, D): logits, or the Gaussian's mean."""
        return mlp(z, self.decoder, self.act, self.out_act)

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example ``-log p(x | z)`` (B,) and ``KL(q(z|x) || p(z))`` (B,)."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.nll(self.decode(z), x), kl_normal(mu, logvar)

    def loss(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Batch means ``(recon + beta * kl, recon, kl)``."""
        recon, kl = self(x, eps)
        return recon.mean() + self.reg_weight * kl.mean(), recon.mean(), kl.mean()


class TorchAutoencoder(nn.Module):
    """Deterministic autoencoder (and, fed a corrupted ``x_in``, the denoising one): encoder
    ``D -> hidden -> Z`` (linear code), decoder ``Z -> reversed(hidden) -> D`` with ``output_activation``;
    loss per example ``sum_j (x_hat_j - x_j)^2``.

    Keys, in order: ``encoder.{i}``, ``decoder.{i}``.
    """

    def __init__(self, input_dim=784, hidden=(128, 64, 12), latent_dim=3, activation="relu", output_activation="tanh",
                 alpha=0.01, code_activation="identity"):
        super().__init__()
        hidden = tuple(hidden)
        self.encoder = linears([input_dim, *hidden, latent_dim])
        self.decoder = linears([latent_dim, *reversed(hidden), input_dim])
        self.act = torch_activation(activation, alpha)
        self.out_act = torch_activation(output_activation)
        self.code_act = torch_activation(code_activation, alpha)
        self.reg_weight = 1.0

    def encode(self, x: Tensor) -> Tensor:
        return mlp(x, self.encoder, self.act, self.code_act)

    def decode(self, z: Tensor) -> Tensor:
        return mlp(z, self.decoder, self.act, self.out_act)

    def code(self, x: Tensor, eps: Tensor | None) -> Tensor:
        return self.encode(x)

    def regulariser(self, code: Tensor) -> Tensor:
        return torch.zeros(code.shape[0], dtype=code.dtype)

    def forward(self, x_in: Tensor, x_target: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-example squared error of reconstructing ``x_target`` from ``x_in`` (B,), and the regulariser (B,)."""
        code = self.code(x_in, eps)
        return ((self.decode(code) - x_target) ** 2).sum(1), self.regulariser(code)

    def loss(self, x_in: Tensor, x_target: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Batch means ``(recon + reg, recon, reg)``."""
        recon, reg = self(x_in, x_target, eps)
        return recon.mean() + self.reg_weight * reg.mean(), recon.mean(), reg.mean()


class TorchPoorMansVAE(TorchAutoencoder):
    """Autoencoder with a noisy code ``z = h + noise_std * eps`` and the penalty ``||z||_2`` per example."""

    def __init__(self, input_dim=784, hidden=(392,), latent_dim=20, activation="sigmoid", output_activation="sigmoid",
                 alpha=0.01, noise_std=1.0, code_penalty="per_image"):
        super().__init__(input_dim, hidden, latent_dim, activation, output_activation, alpha)
        self.noise_std = float(noise_std)
        self.code_penalty = code_penalty

    def code(self, x: Tensor, eps: Tensor) -> Tensor:
        return self.encode(x) + self.noise_std * eps

    def regulariser(self, z: Tensor) -> Tensor:
        if self.code_penalty == "batch":  # the write-up's one norm of the batch, each example's share of it
            return (z.pow(2).sum().sqrt() / z.shape[0]).expand(z.shape[0])
        return torch.linalg.vector_norm(z, dim=1)


class TorchSparseAutoencoder(TorchAutoencoder):
    """Autoencoder with a sparsity penalty on the code h: ``sum_j |h_j|`` per example (l1), or the batch's
    ``sum_j KL(rho || mean_i h_ij)`` as every example's term (kl); weighted by ``sparsity_weight``."""

    def __init__(self, *args, sparsity_penalty="kl", sparsity_weight=3.0, sparsity_target=0.05, **kwargs):
        super().__init__(*args, **kwargs)
        self.penalty, self.reg_weight, self.rho = sparsity_penalty, float(sparsity_weight), float(sparsity_target)

    def regulariser(self, h: Tensor) -> Tensor:
        if self.penalty == "l1":
            return h.abs().sum(1)
        rho, rho_hat = self.rho, h.mean(0)
        kl = (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()
        return kl.expand(h.shape[0])


class TorchContractiveAutoencoder(TorchAutoencoder):
    """Autoencoder with the penalty ``||dh/dx||_F^2`` per example, the Jacobian taken by autograd with
    ``create_graph=True`` (so ``loss.backward()`` differentiates it again: double backward)."""

    def __init__(self, *args, contraction_weight=0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.reg_weight = float(contraction_weight)

    def forward(self, x_in: Tensor, x_target: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x_in = x_in.detach().requires_grad_(True)
        h = self.encode(x_in)
        rows = []
        for j in range(h.shape[1]):  # row j of every example's Jacobian: (B, D)
            (dj,) = torch.autograd.grad(h[:, j].sum(), x_in, create_graph=True)
            rows.append((dj**2).sum(1))
        return ((self.decode(h) - x_target) ** 2).sum(1), torch.stack(rows, 1).sum(1)


# ----------------------------------------------------------------------------- bridging to npvae


def to_torch(state: dict, dtype=torch.float64) -> dict[str, Tensor]:
    """An npvae state dict (NumPy arrays) as torch tensors of ``dtype`` (copies), same keys and order."""
    return {key: torch.tensor(np.asarray(value), dtype=dtype) for key, value in state.items()}


def reference_for(model: models.Model, dtype=torch.float64) -> nn.Module:
    """The torch reference of an npvae model, same architecture, its weights loaded with ``strict=True``."""
    c = model.config
    if type(model) is models.VAE:  # subclasses (the CVAE) have their own architecture
        ref = TorchVAE(c.input_dim, c.hidden, c.latent_dim, c.activation, c.likelihood, c.beta, c.alpha,
                       c.logvar_bounds)
    elif isinstance(model, models.PoorMansVAE):
        ref = TorchPoorMansVAE(c.input_dim, c.hidden, c.latent_dim, c.activation, c.output_activation, c.alpha,
                               c.noise_std, c.code_penalty)
    elif isinstance(model, models.SparseAutoencoder):
        ref = TorchSparseAutoencoder(c.input_dim, c.hidden, c.latent_dim, c.activation, c.output_activation, c.alpha,
                                     c.code_activation, sparsity_penalty=c.sparsity_penalty,
                                     sparsity_weight=c.sparsity_weight, sparsity_target=c.sparsity_target)
    elif isinstance(model, models.ContractiveAutoencoder):
        ref = TorchContractiveAutoencoder(c.input_dim, c.hidden, c.latent_dim, c.activation, c.output_activation,
                                          c.alpha, c.code_activation, contraction_weight=c.contraction_weight)
    elif isinstance(model, models.Autoencoder):
        ref = TorchAutoencoder(c.input_dim, c.hidden, c.latent_dim, c.activation, c.output_activation, c.alpha,
                               c.code_activation)
    else:
        raise TypeError(f"no torch reference for {type(model).__name__}")
    ref.to(dtype).load_state_dict(to_torch(model.state_dict(), dtype), strict=True)
    return ref


def gradients(module: nn.Module) -> dict[str, np.ndarray]:
    """Each parameter's ``.grad`` as a NumPy array (zeros where autograd left None), in parameter order."""
    return {
        name: (torch.zeros_like(p) if p.grad is None else p.grad).detach().numpy().copy()
        for name, p in module.named_parameters()
    }


def rel_error(ours, theirs, floor: float = 0.0) -> float:
    """``max|a - b| / max(max|a|, max|b|, floor)``: the error relative to the array's scale.

    Not elementwise: entries of a gradient that cancel to ~0 would make an elementwise ratio noise.
    Two all-zero arrays have error 0.
    """
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), floor)
    return 0.0 if scale == 0 else float(np.abs(a - b).max() / scale)


def gradient_errors(ours: dict, theirs: dict, rel_floor: float = 1e-5, abs_floor: float = 1e-4) -> dict[str, float]:
    """:func:`rel_error` of each gradient, with its scale floored at ``max(rel_floor * G, abs_floor)``,
    G the model's largest gradient entry.

    The floors are for layers behind a saturated sigmoid or tanh. Both implementations take the
    derivative through the output, ``1 - y^2`` or ``y (1 - y)``, which is ~1e-8 at |a| ~ 10 and has
    an absolute error ~1e-16: the gradient shrinks while its absolute error does not, so it is only
    accurate relative to the gradient it would have unsaturated. ``abs_floor`` covers a whole model
    behind a saturated output (G itself tiny); both floors sit far below the gradients a bug changes.
    """
    if list(ours) != list(theirs):
        raise ValueError(f"gradient keys differ: {list(ours)} vs {list(theirs)}")
    largest = max((float(np.abs(np.asarray(g)).max(initial=0.0)) for g in theirs.values()), default=0.0)
    floor = max(rel_floor * largest, abs_floor)
    return {key: rel_error(ours[key], theirs[key], floor) for key in ours}


# ----------------------------------------------------------------------------- the convolutional presets
# Written from the write-ups with torch's own modules. Keras' "same" padding (total
# max((ceil(n / s) - 1) s + k - n, 0), the odd pixel at the bottom/right) is not a torch padding
# mode for strides > 1 or even totals, so these modules pad (or crop) explicitly.


def keras_same(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras' "same" padding of one axis: (before, after)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with Keras' "same" padding."""

    def forward(self, x: Tensor) -> Tensor:
        (t, b), (l, r) = (keras_same(n, k, s) for n, k, s in zip(x.shape[2:], self.kernel_size, self.stride))
        return F.conv2d(F.pad(x, (l, r, t, b)), self.weight, self.bias, self.stride)


class SameMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with Keras' "same" padding (the padding never wins)."""

    def forward(self, x: Tensor) -> Tensor:
        k, s = (self.kernel_size,) * 2, (self.stride,) * 2
        (t, b), (l, r) = (keras_same(n, ki, si) for n, ki, si in zip(x.shape[2:], k, s))
        return F.max_pool2d(F.pad(x, (l, r, t, b), value=-math.inf), k, s)


class SameConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` as Keras' ``Conv2DTranspose(padding="same")``: output ``H * stride``, the full
    output ``(H - 1) s + k`` cropped by ``k - s``, the odd row/column at the bottom/right."""

    def forward(self, x: Tensor) -> Tensor:
        full = F.conv_transpose2d(x, self.weight, self.bias, self.stride)
        (t, b), (l, r) = (((k - s) // 2, k - s - (k - s) // 2) for k, s in zip(self.kernel_size, self.stride))
        return full[:, :, t: full.shape[2] - b, l: full.shape[3] - r]


def load_in_order(module: nn.Module, state: dict, dtype=torch.float64) -> nn.Module:
    """Copy an npvae state dict into ``module``'s parameters in order, each shape exactly as it is (the
    torch module names its layers by position in its nn.Sequential, with activations in between)."""
    params = list(module.named_parameters())
    if len(params) != len(state):
        raise ValueError(f"{len(params)} torch parameters, {len(state)} npvae arrays")
    for (name, p), (key, value) in zip(params, state.items()):
        if tuple(p.shape) != np.shape(value):
            raise ValueError(f"{name} {tuple(p.shape)} does not fit {key} {np.shape(value)}")
        p.data = torch.tensor(np.asarray(value), dtype=dtype)
    return module.to(dtype)


def torch_conv_vae_parts(side: int = 28, latent_dim: int = 2):
    """The Keras write-up's conv VAE: encoder, heads (mu, second head), decoder (logits)."""
    h = side // 2
    encoder = nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        SameConv2d(1, 32, 3), nn.ReLU(),
        SameConv2d(32, 64, 3, stride=2), nn.ReLU(),
        SameConv2d(64, 64, 3), nn.ReLU(),
        SameConv2d(64, 64, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * h * h, 32), nn.ReLU())
    decoder = nn.Sequential(
        nn.Linear(latent_dim, h * h * 64), nn.ReLU(), nn.Unflatten(1, (64, h, h)),
        SameConvTranspose2d(64, 32, 3, stride=2), nn.ReLU(),
        SameConv2d(32, 1, 3), nn.Flatten())
    return encoder, nn.Linear(32, latent_dim), nn.Linear(32, latent_dim), decoder


class TorchConvVAE(nn.Module):
    """The conv VAE with a consistent parameterization: the second head is log sigma^2 (``"logvar"``) or
    log sigma (``"log_sigma"``, logvar = 2 h) in the sampler and the KL alike; Bernoulli decoder (BCE)."""

    def __init__(self, side=28, latent_dim=2, parameterization="logvar", beta=1.0):
        super().__init__()
        self.encoder, self.mu, self.second, self.decoder = torch_conv_vae_parts(side, latent_dim)
        self.scale = 2.0 if parameterization == "log_sigma" else 1.0
        self.reg_weight = float(beta)

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        mu, logvar = self.mu(h), self.scale * self.second(h)
        z = mu + torch.exp(0.5 * logvar) * eps
        return bernoulli_nll(self.decoder(z), x), kl_normal(mu, logvar)

    def loss(self, x: Tensor, eps: Tensor):
        recon, kl = self(x, eps)
        return recon.mean() + self.reg_weight * kl.mean(), recon.mean(), kl.mean()


def torch_conv_dae(side: int = 28) -> nn.Module:
    """The denoising write-up's conv autoencoder: encoder and decoder nn.Sequential."""
    code = math.ceil(math.ceil(math.ceil(side / 2) / 2) / 2)
    encoder = nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        SameConv2d(1, 64, 3), nn.ReLU(), SameMaxPool2d(2),
        SameConv2d(64, 32, 3), nn.ReLU(), SameMaxPool2d(2),
        SameConv2d(32, 16, 3), nn.ReLU(), SameMaxPool2d(2), nn.Flatten())
    decoder = nn.Sequential(
        nn.Unflatten(1, (16, code, code)),
        SameConv2d(16, 16, 3), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
        SameConv2d(16, 32, 3), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
        SameConv2d(64, 1, 3), nn.Sigmoid(), nn.Flatten())
    return nn.ModuleDict({"encoder": encoder, "decoder": decoder})


def torch_conv_ae() -> nn.Module:
    """The PyTorch write-up's conv autoencoder, as written there (plus the reshapes of flat rows)."""
    encoder = nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 16, 3, stride=3, padding=1), nn.ReLU(True), nn.MaxPool2d(2, stride=2),
        nn.Conv2d(16, 8, 3, stride=2, padding=1), nn.ReLU(True), nn.MaxPool2d(2, stride=1), nn.Flatten())
    decoder = nn.Sequential(
        nn.Unflatten(1, (8, 2, 2)),
        nn.ConvTranspose2d(8, 16, 3, stride=2), nn.ReLU(True),
        nn.ConvTranspose2d(16, 8, 5, stride=3, padding=1), nn.ReLU(True),
        nn.ConvTranspose2d(8, 1, 2, stride=2, padding=1), nn.Tanh(), nn.Flatten())
    return nn.ModuleDict({"encoder": encoder, "decoder": decoder})


def torch_conv_doc_dae(height: int, width: int) -> nn.Module:
    """The document-cleaning autoencoder for (height, width) pages."""
    encoder = nn.Sequential(nn.Unflatten(1, (1, height, width)), SameConv2d(1, 64, 3), nn.ReLU(), SameMaxPool2d(2),
                            nn.Flatten())
    decoder = nn.Sequential(nn.Unflatten(1, (64, height // 2, width // 2)), SameConv2d(64, 64, 3), nn.ReLU(),
                            nn.Upsample(scale_factor=2, mode="nearest"), SameConv2d(64, 1, 3), nn.Sigmoid(),
                            nn.Flatten())
    return nn.ModuleDict({"encoder": encoder, "decoder": decoder})


def squared_error_loss(ae: nn.Module, x_in: Tensor, x_target: Tensor) -> Tensor:
    """Batch mean of the per-example squared error of an encoder/decoder ModuleDict on flat rows."""
    out = ae["decoder"](ae["encoder"](x_in))
    return ((out - x_target.reshape(len(x_target), -1)) ** 2).sum(1).mean()
