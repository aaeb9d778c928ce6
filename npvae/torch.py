"""npvae models as PyTorch modules and back: train here on a CPU, continue in PyTorch on a GPU (and the reverse).

::

    module = to_torch(model).to("cuda")      # an nn.Module: same layers, same state-dict keys, same forward
    ...                                      # train it with any torch optimizer
    model = from_torch(module)               # an npvae model again, on the CPU, with the trained weights

:func:`to_torch` returns a :class:`NpvaeModule` whose parts are ``nn.Sequential`` stacks named as
npvae names them (``encoder``, ``decoder``, ``prior``) and whose Gaussian heads are ``nn.Linear``
layers registered under their own names (``mu``, ``logvar``, ``prior_mu``, ``prior_logvar``), so
``module.state_dict()`` has exactly the keys, order and shapes of ``model.state_dict()``. Its
``forward(x, y=None, eps=None, target=None)`` returns the per-example terms ``(recon (B,), reg (B,))``
of npvae's :meth:`~npvae.models.base.Model.forward` (noise drawn with torch when ``eps`` is not
given), and ``loss(...)`` their batch means ``(total, recon, reg)``, ``total = recon + reg_weight * reg``,
which is what :meth:`~npvae.models.base.Model.loss_and_grads` differentiates. ``encode``, ``decode``
and ``sample`` match npvae's too.

Layer-driven
------------
Nothing here knows a model's architecture: each part is translated layer by layer through
:data:`LAYERS`, which maps an npvae layer type (a class of :data:`npvae.layers.LAYER_TYPES`) to a
builder of its torch module and back (:class:`LayerBridge`). A new npvae layer needs one
:func:`register_layer` call. Activations cross through their :data:`npvae.ops.ACTIVATIONS` entries,
each naming its ``torch.nn`` class (a new activation needs nothing here). Torch's own ``nn.Linear``,
those activation classes (``nn.ReLU``, ``nn.LeakyReLU``, ...), ``nn.Flatten``, ``nn.Unflatten``,
``nn.Conv2d``, ``nn.ConvTranspose2d``, ``nn.MaxPool2d`` and ``nn.Upsample`` (nearest, integer
factors) are read back too, so a part replaced in torch by a stack of those comes back to npvae as a
model with its own layers. A subclass of one of them with a ``forward`` of its own is refused: npvae
cannot know what it computes.

What torch shares, npvae either represents exactly or refuses by name: a parameter-free module used
at two places comes back at both; a module with parameters used twice, or parameters tied between
modules, are refused (every npvae layer owns its parameters). A head assigned in torch
(``module.mu = nn.Linear(...)``) is the one that runs and the one that comes back.

Image layers
------------
npvae's padding has forms torch's has not: Keras' ``"same"`` at any stride (output ``ceil(H / s)``,
the odd pixel at the bottom/right; torch's ``padding="same"`` is that at stride 1 only), a transposed
``"same"`` (output ``H s``) and a max-pool ``"same"`` (padding -inf). :class:`Conv2d`,
:class:`ConvTranspose2d` and :class:`MaxPool2d` subclass torch's modules (same parameter names and
shapes, so the same state-dict keys), keep npvae's padding and fused activation, and resolve "same"
per call from the image size (``F.pad``, or a crop of the full transposed output).

Importing this module imports torch; ``import npvae`` never imports this module.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

try:
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn
except ImportError as exc:  # pragma: no cover - exercised only where torch is missing
    raise ImportError("npvae.torch needs PyTorch: pip install torch") from exc

from . import conv, ops
from . import layers as L
from .models import from_spec
from .models.base import Model

__all__ = ["to_torch", "from_torch", "register_layer", "LAYERS", "LayerBridge", "NpvaeModule", "Dense", "Activation",
           "Reshape", "GaussianHeads", "Conv2d", "ConvTranspose2d", "MaxPool2d"]

LOG_2PI = math.log(2 * math.pi)

# ----------------------------------------------------------------------------- torch modules of npvae layers


# Where a torch.nn class computes an activation only approximately, the exact form used instead.
# nn.Softplus returns a itself above its threshold (20): 2e-9 off npvae's log(1 + e^a) there.
_EXACT_FORMS: dict[type, Callable[[Tensor], Tensor]] = {
    nn.Softplus: lambda a: torch.logaddexp(a, torch.zeros_like(a)),
}


@functools.lru_cache(maxsize=None)
def _activation(name: str, alpha: float) -> Callable[[Tensor], Tensor]:
    """npvae's activation ``name`` in torch, from its :data:`npvae.ops.ACTIVATIONS` entry: the torch.nn
    class it names (parameter-free, so one instance serves every layer), or that class's exact form."""
    entry = ops.ACTIVATIONS[name]
    cls = getattr(nn, entry.torch)
    if cls in _EXACT_FORMS:
        return _EXACT_FORMS[cls]
    return cls(**({entry.torch_alpha: alpha} if entry.takes_alpha else {}), **entry.torch_fixed)


def _alpha_repr(name: str, alpha: float) -> str:
    return f", alpha={alpha:g}" if ops.ACTIVATIONS[name].takes_alpha else ""


class Dense(nn.Linear):
    """npvae's :class:`~npvae.layers.Dense`: ``nn.Linear`` followed by its activation, one module, so the
    state-dict keys are ``{i}.weight`` and ``{i}.bias`` as in npvae."""

    def __init__(self, in_features: int, out_features: int, activation: str = "identity", alpha: float = 0.01, **kw):
        super().__init__(in_features, out_features, **kw)
        self.activation, self.alpha = ops.ACTIVATIONS.check(activation), float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        return _activation(self.activation, self.alpha)(super().forward(x))

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.activation == "identity" else f", activation={self.activation}")


class Activation(nn.Module):
    """npvae's :class:`~npvae.layers.Activation`: an elementwise activation by name."""

    def __init__(self, name: str, alpha: float = 0.01):
        super().__init__()
        self.name, self.alpha = ops.ACTIVATIONS.check(name), float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        return _activation(self.name, self.alpha)(x)

    def extra_repr(self) -> str:
        return repr(self.name) + _alpha_repr(self.name, self.alpha)


class Reshape(nn.Module):
    """npvae's :class:`~npvae.layers.Reshape`: (B, ...) -> (B, *shape)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return str(self.shape)


def _image_pads(padding, x: Tensor, kernel, stride) -> tuple[int, int, int, int]:
    """npvae's padding of a batch x (B, C, H, W) as ``F.pad``'s (left, right, top, bottom): Keras' "same"
    depends on the image's size (and puts the odd pixel at the bottom/right), so it is resolved per call."""
    (top, bottom), (left, right) = conv.conv_pads(padding, tuple(x.shape[2:]), kernel, stride)
    return left, right, top, bottom


def _numeric_padding(padding):
    """torch's padding of npvae's int, pair or ``"valid"`` (``"same"`` is resolved per call)."""
    return 0 if padding in ("valid", "same") else padding


class Conv2d(nn.Conv2d):
    """npvae's :class:`~npvae.layers.Conv2d`: ``nn.Conv2d`` with npvae's padding and its fused activation,
    one module, so the state-dict keys are ``{i}.weight`` (C_out, C_in, kH, kW) and ``{i}.bias``.

    ``padding`` is npvae's: an int or pair (as torch), ``"valid"``, or Keras' ``"same"`` for any stride
    (output ``ceil(H / s)``, the odd pixel at the bottom/right), which torch's ``padding="same"`` is only
    for stride 1. An asymmetric "same" pads with ``F.pad`` before the convolution.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, activation: str = "identity",
                 alpha: float = 0.01, **kw):
        super().__init__(in_channels, out_channels, kernel_size, stride, _numeric_padding(padding), **kw)
        self.npvae_padding = padding
        self.activation, self.alpha = ops.ACTIVATIONS.check(activation), float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        if self.npvae_padding != "same":
            return _activation(self.activation, self.alpha)(super().forward(x))
        left, right, top, bottom = _image_pads("same", x, self.kernel_size, self.stride)
        if (left, top) == (right, bottom):
            y = F.conv2d(x, self.weight, self.bias, self.stride, (top, left))
        else:
            y = F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride)
        return _activation(self.activation, self.alpha)(y)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.npvae_padding == "same":
            text += ", padding='same' (Keras: odd pixel bottom/right)"
        return text + ("" if self.activation == "identity" else f", activation={self.activation}")


class ConvTranspose2d(nn.ConvTranspose2d):
    """npvae's :class:`~npvae.layers.ConvTranspose2d`: ``nn.ConvTranspose2d`` (weight (C_in, C_out, kH, kW))
    with npvae's padding and its fused activation; keys ``{i}.weight`` and ``{i}.bias``.

    Numeric ``padding`` and ``output_padding`` are torch's. Keras' ``"same"`` (output ``H s``) crops the
    full output ``(H - 1) s + k`` by ``k - s``, the odd row/column at the bottom/right, which no torch
    padding does when ``k - s`` is odd: the full output is computed and cropped here. Where ``k < s`` the
    crop is negative: ``output_padding = s - k`` appends those rows (holding the bias, as in npvae).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 activation: str = "identity", alpha: float = 0.01, **kw):
        super().__init__(in_channels, out_channels, kernel_size, stride, _numeric_padding(padding), output_padding,
                         **kw)
        self.npvae_padding, self.npvae_output_padding = padding, output_padding
        self.activation, self.alpha = ops.ACTIVATIONS.check(activation), float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        if self.npvae_padding != "same":
            return _activation(self.activation, self.alpha)(super().forward(x))
        (top, bottom), (left, right) = conv.transpose_crops("same", 0, self.kernel_size, self.stride)
        y = F.conv_transpose2d(x, self.weight, self.bias, self.stride,
                               output_padding=(max(-bottom, 0), max(-right, 0)))
        y = y[:, :, top: y.shape[2] - max(bottom, 0), left: y.shape[3] - max(right, 0)]
        return _activation(self.activation, self.alpha)(y)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.npvae_padding == "same":
            text += ", padding='same' (Keras: output H * stride, odd crop bottom/right)"
        return text + ("" if self.activation == "identity" else f", activation={self.activation}")


class MaxPool2d(nn.MaxPool2d):
    """npvae's :class:`~npvae.layers.MaxPool2d`: ``nn.MaxPool2d`` with npvae's padding. Numeric padding
    is torch's (at most half the kernel, never winning); Keras' ``"same"`` pads with -inf (``F.pad``)
    before pooling, the odd pixel at the bottom/right."""

    def __init__(self, kernel_size=2, stride=None, padding=0):
        super().__init__(kernel_size, stride, _numeric_padding(padding))
        self.npvae_padding = padding

    def forward(self, x: Tensor) -> Tensor:
        if self.npvae_padding != "same":
            return super().forward(x)
        pads = _image_pads("same", x, conv.as_pair(self.kernel_size, "kernel_size", "MaxPool2d", 1),
                           conv.as_pair(self.stride, "stride", "MaxPool2d", 1))
        if any(pads):
            x = F.pad(x, pads, value=-math.inf)
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", padding='same' (Keras, -inf)" if self.npvae_padding == "same" else "")


class GaussianHeads(nn.Module):
    """npvae's :class:`~npvae.layers.GaussianHeads`: two ``nn.Linear`` heads (mu, logvar), given by name.

    Parameters
    ----------
    heads : dict of name -> nn.Linear
        ``{"mu": ..., "logvar": ...}`` in that order (the CVAE's prior: ``prior_mu``, ``prior_logvar``).

    :class:`NpvaeModule` registers the two linears under those names (npvae's state-dict keys
    ``mu.weight``, ...), once, and assembles this module from them when it runs.
    """

    def __init__(self, heads: dict[str, nn.Module]):
        super().__init__()
        self.names = tuple(heads)
        for name, head in heads.items():
            self.add_module(name, head)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, H) -> mu (B, Z), logvar (B, Z)."""
        return tuple(getattr(self, name)(h) for name in self.names)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class LayerBridge:
    """How one npvae layer type crosses to torch and back.

    to_torch : npvae layer -> nn.Module (the architecture; weights travel through the state dict)
    from_torch : nn.Module -> npvae layer
    torch_types : the torch module classes ``from_torch`` reads
    """

    to_torch: Callable[[L.Layer], nn.Module]
    from_torch: Callable[[nn.Module], L.Layer]
    torch_types: tuple[type, ...]


#: npvae layer type -> its :class:`LayerBridge`.
LAYERS: dict[type, LayerBridge] = {}


def register_layer(layer_type: type, to_torch: Callable, from_torch: Callable, torch_types) -> None:
    """Teach :func:`to_torch` and :func:`from_torch` one npvae layer type.

    Parameters
    ----------
    layer_type : an npvae layer class (a subclass of :class:`npvae.layers.Layer`)
    to_torch : callable, layer -> nn.Module whose parameters are named as the layer's
        :meth:`~npvae.layers.Layer.param_shapes` (``weight``, ``bias``) with the same shapes
    from_torch : callable, nn.Module -> layer
    torch_types : class or tuple of classes, the torch modules ``from_torch`` reads
    """
    types = tuple(torch_types) if isinstance(torch_types, (tuple, list)) else (torch_types,)
    LAYERS[layer_type] = LayerBridge(to_torch, from_torch, types)


def _linear_from_torch(module: nn.Linear) -> L.Dense:
    if module.bias is None:
        raise ValueError(f"{module} has no bias; npvae's Dense layers have one (nn.Linear(..., bias=True))")
    return L.Dense(module.in_features, module.out_features, getattr(module, "activation", "identity"),
                   getattr(module, "alpha", 0.01))


def _activation_from_torch(module: nn.Module) -> L.Activation:
    if isinstance(module, Activation):
        return L.Activation(module.name, module.alpha)
    for entry in ops.ACTIVATIONS.values():
        if isinstance(module, getattr(nn, entry.torch)):
            for attr, value in entry.torch_fixed.items():
                if getattr(module, attr) != value:
                    raise ValueError(f"{module}: npvae's {entry.name} is {entry.torch} with {attr}={value:g}")
            return L.Activation(entry.name, *([getattr(module, entry.torch_alpha)] if entry.takes_alpha else []))
    raise TypeError(f"{module}: npvae has no activation for a torch {type(module).__name__}")


def _flatten_from_torch(module: nn.Flatten) -> L.Flatten:
    if module.start_dim != 1 or module.end_dim != -1:
        raise ValueError(f"{module}: npvae's Flatten keeps the batch axis and flattens the rest "
                         "(nn.Flatten(start_dim=1, end_dim=-1))")
    return L.Flatten()


def _reshape_from_torch(module: nn.Module) -> L.Reshape:
    if isinstance(module, nn.Unflatten) and module.dim != 1:
        raise ValueError(f"{module}: npvae's Reshape unflattens the axis after the batch (nn.Unflatten(1, shape))")
    return L.Reshape(module.shape if isinstance(module, Reshape) else module.unflattened_size)


def _children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, child) of every place in ``module``: a child used at two places is listed at both, where
    ``named_children`` lists it once."""
    return [(name, child) for name, child in module._modules.items() if child is not None]


def _sequential_from_torch(module: nn.Sequential, path: str = "module") -> L.Sequential:
    return L.Sequential([layer_from_torch(child, f"{path}.{name}") for name, child in _children(module)])


def _heads_from_torch(module: GaussianHeads) -> L.GaussianHeads:
    """The heads as they are now (a head assigned in torch included): two affine maps of one shape."""
    heads = [layer_from_torch(getattr(module, name), name) for name in module.names]
    for name, head in zip(module.names, heads):
        if type(head) is not L.Dense or head.activation != "identity":
            raise ValueError(f"{name} is {head!r}: npvae's Gaussian heads are affine maps (an nn.Linear each)")
    if len({(head.in_dim, head.out_dim) for head in heads}) != 1:
        shapes = " and ".join(f"{name} {head.in_dim} -> {head.out_dim}" for name, head in zip(module.names, heads))
        raise ValueError(f"the heads differ ({shapes}): npvae's Gaussian heads read the same features and give "
                         "codes of the same size")
    return L.GaussianHeads(heads[0].in_dim, heads[0].out_dim, module.names)


def _plain_padding(padding):
    """npvae's padding of a torch conv's: "valid" and "same" as they are, (p, p) as p, else the pair."""
    if isinstance(padding, str):
        return padding
    ph, pw = padding
    return ph if ph == pw else (ph, pw)


def _check_plain_conv(module: nn.Module, kind: str) -> None:
    """npvae's convolutions are dense (groups 1), undilated, zero-padded, with a bias."""
    if module.bias is None:
        raise ValueError(f"{module} has no bias; npvae's {kind} layers have one (bias=True)")
    if module.groups != 1 or tuple(module.dilation) != (1, 1) or module.padding_mode != "zeros":
        raise ValueError(f"{module}: npvae's {kind} has groups=1, dilation=1 and padding_mode='zeros'")


def _conv_from_torch(module: nn.Conv2d) -> L.Conv2d:
    _check_plain_conv(module, "Conv2d")
    padding = getattr(module, "npvae_padding", None)
    if padding is None:  # torch's own: its "same" (stride 1) puts the odd pixel bottom/right, as Keras'
        padding = _plain_padding(module.padding)
    return L.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, padding,
                    getattr(module, "activation", "identity"), getattr(module, "alpha", 0.01))


def _conv_transpose_from_torch(module: nn.ConvTranspose2d) -> L.ConvTranspose2d:
    _check_plain_conv(module, "ConvTranspose2d")
    if hasattr(module, "npvae_padding"):
        padding, output_padding = module.npvae_padding, module.npvae_output_padding
    else:
        padding, output_padding = _plain_padding(module.padding), tuple(module.output_padding)
    return L.ConvTranspose2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, padding,
                             output_padding, getattr(module, "activation", "identity"), getattr(module, "alpha", 0.01))


def _max_pool_from_torch(module: nn.MaxPool2d) -> L.MaxPool2d:
    if module.ceil_mode or module.return_indices or conv.as_pair(module.dilation, "dilation", "MaxPool2d", 1) != (1, 1):
        raise ValueError(f"{module}: npvae's MaxPool2d has dilation=1, ceil_mode=False and return_indices=False")
    padding = getattr(module, "npvae_padding", None)
    if padding is None:
        padding = module.padding if isinstance(module.padding, int) else _plain_padding(module.padding)
    kernel = module.kernel_size if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    stride = module.stride if isinstance(module.stride, int) else tuple(module.stride)
    return L.MaxPool2d(kernel, stride, padding)


def _upsample_from_torch(module: nn.Upsample) -> L.Upsample2d:
    scale = module.scale_factor
    scale = scale if isinstance(scale, (tuple, list)) else (scale, scale)
    if module.mode != "nearest" or module.size is not None or len(scale) != 2 or any(
            s is None or s != int(s) or s < 1 for s in scale):
        raise ValueError(f"{module}: npvae's Upsample2d is nn.Upsample(scale_factor=s, mode='nearest') with "
                         "integer factors s >= 1 (not a size, not another mode)")
    sh, sw = int(scale[0]), int(scale[1])
    return L.Upsample2d(sh if sh == sw else (sh, sw))


register_layer(L.Dense, lambda l: Dense(l.in_dim, l.out_dim, l.activation, l.alpha), _linear_from_torch,
               (Dense, nn.Linear))
register_layer(L.GaussianHeads, lambda l: GaussianHeads({name: nn.Linear(l.in_dim, l.latent_dim) for name in l.names}),
               _heads_from_torch, GaussianHeads)
register_layer(L.Activation, lambda l: Activation(l.name, l.alpha), _activation_from_torch,
               (Activation, *(getattr(nn, entry.torch) for entry in ops.ACTIVATIONS.values())))
register_layer(L.Flatten, lambda l: nn.Flatten(), _flatten_from_torch, nn.Flatten)
register_layer(L.Reshape, lambda l: Reshape(l.shape), _reshape_from_torch, (Reshape, nn.Unflatten))
register_layer(L.Conv2d, lambda l: Conv2d(l.in_channels, l.out_channels, l.kernel_size, l.stride, l.padding,
                                            l.activation, l.alpha), _conv_from_torch, (Conv2d, nn.Conv2d))
register_layer(L.ConvTranspose2d, lambda l: ConvTranspose2d(l.in_channels, l.out_channels, l.kernel_size, l.stride,
                                                            l.padding, l.output_padding, l.activation, l.alpha),
               _conv_transpose_from_torch, (ConvTranspose2d, nn.ConvTranspose2d))
register_layer(L.MaxPool2d, lambda l: MaxPool2d(l.kernel_size, l.stride, l.padding), _max_pool_from_torch,
               (MaxPool2d, nn.MaxPool2d))
register_layer(L.Upsample2d, lambda l: nn.Upsample(scale_factor=tuple(float(s) for s in l.scale), mode="nearest"),
               _upsample_from_torch, nn.Upsample)
register_layer(L.Sequential, lambda l: nn.Sequential(*(layer_to_torch(child) for child in l)), _sequential_from_torch,
               nn.Sequential)


def layer_to_torch(layer: L.Layer) -> nn.Module:
    """The torch module of an npvae layer (the most specific registered type wins)."""
    for cls in type(layer).__mro__:
        if cls in LAYERS:
            return LAYERS[cls].to_torch(layer)
    raise TypeError(f"npvae.torch has no torch module for {type(layer).__name__}: register one with "
                    "npvae.torch.register_layer")


def layer_from_torch(module: nn.Module, path: str = "module") -> L.Layer:
    """The npvae layer of a torch module (the most specific registered torch type wins); ``path`` names
    it in errors."""
    readers = {t: bridge for bridge in LAYERS.values() for t in bridge.torch_types}
    for cls in type(module).__mro__:
        if cls in readers:
            if type(module).forward is not cls.forward:
                raise TypeError(f"{path} is a {type(module).__name__}, a torch {cls.__name__} with a forward of its "
                                f"own, which npvae cannot read (it reads {cls.__name__} as torch computes it)")
            if cls is nn.Sequential:
                return _sequential_from_torch(module, path)
            return readers[cls].from_torch(module)
    known = sorted({t.__name__ for t in readers})
    raise TypeError(f"{path} is a torch {type(module).__name__}, which npvae has no layer for (it reads "
                    f"{', '.join(known)}; npvae.torch.register_layer adds one)")


# ----------------------------------------------------------------------------- the models


def _bernoulli_nll(out: Tensor, x: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)


def _cb_log_norm(logits: Tensor) -> Tensor:
    """log C(l) = log(l / tanh(l / 2)); its series log 2 + l^2 / 12 below |l| < 1e-4, where the closed
    form (and its autograd derivative) cancels."""
    small = logits.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(logits), logits)
    return torch.where(small, math.log(2) + logits**2 / 12, torch.log(safe / torch.tanh(safe / 2)))


def _cb_mean(logits: Tensor) -> Tensor:
    small = logits.abs() < 0.1
    safe = torch.where(small, torch.ones_like(logits), logits)
    l2 = logits * logits
    series = 0.5 + logits * (1 / 12 + l2 * (-1 / 720 + l2 * (1 / 30240 - l2 / 1209600)))
    return torch.where(small, series, torch.sigmoid(safe) / torch.tanh(safe / 2) - 1 / safe)


# likelihood -> (-log p(x | out) per example (B, D) -> (B,), the mean of p(x | out))
LIKELIHOODS = {
    "bernoulli": (_bernoulli_nll, torch.sigmoid),
    "continuous_bernoulli": (lambda out, x: _bernoulli_nll(out, x) - _cb_log_norm(out).sum(1), _cb_mean),
    "gaussian": (lambda out, x: 0.5 * ((out - x) ** 2).sum(1) + 0.5 * x.shape[1] * LOG_2PI, lambda out: out),
}


class NpvaeModule(nn.Module):
    """What every translated model shares: its parts, registered in npvae's order, and its spec.

    ``spec`` is the npvae model's :meth:`~npvae.models.base.Model.spec` without its parts (those are
    read back from the modules by :func:`from_torch`).
    """

    def __init__(self, spec: dict, parts: dict[str, nn.Module]):
        super().__init__()
        self.spec = spec
        self.part_names = list(parts)
        self.input_shape = tuple(spec["input_shape"])
        self._heads: dict[str, tuple[str, ...]] = {}  # a heads part -> the names its linears are registered under
        for name, module in parts.items():
            if isinstance(module, GaussianHeads):
                self._heads[name] = module.names
                for head in module.names:  # npvae's keys: mu.weight, not heads.mu.weight; registered here only,
                    self.add_module(head, getattr(module, head))  # so a head assigned anew is the one that runs
            else:
                self.add_module(name, module)

    def part(self, name: str) -> nn.Module:
        """The module of npvae's part ``name`` (``encoder``, ``heads``, ...); a heads part is assembled from
        the head modules registered now."""
        if name in self._heads:
            return GaussianHeads({head: getattr(self, head) for head in self._heads[name]})
        return getattr(self, name)

    def _noise(self, like: Tensor, eps: Tensor | None) -> Tensor:
        return torch.randn_like(like) if eps is None else eps

    def loss(self, x: Tensor, y: Tensor | None = None, eps: Tensor | None = None, target: Tensor | None = None,
             **kw) -> tuple[Tensor, Tensor, Tensor]:
        """Batch means ``(recon + reg_weight * reg, recon, reg)``: what npvae's ``loss_and_grads`` differentiates."""
        recon, reg = self(x, y, eps, target, **kw)
        return recon.mean() + self.reg_weight * reg.mean(), recon.mean(), reg.mean()

    def extra_repr(self) -> str:
        return f"npvae {self.spec['class']}, input_shape={self.input_shape}"


class VAEModule(NpvaeModule):
    """A Gaussian VAE: ``z = mu + exp(logvar / 2) * eps``, ``recon = -log p(x | z)``, ``reg = KL(q || N(0, I))``."""

    def __init__(self, spec, parts):
        super().__init__(spec, parts)
        c = spec["config"]
        self.latent_dim, self.reg_weight, self.likelihood = int(c["latent_dim"]), float(c["beta"]), c["likelihood"]
        bounds = c.get("logvar_bounds")
        self.logvar_bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))
        # the conv VAE's second head may emit log sigma: logvar = 2 h in the sampler and the KL alike
        self.logvar_scale = 2.0 if c.get("parameterization") == "log_sigma" else 1.0

    def _encoder_input(self, x: Tensor, y) -> Tensor:
        return x

    def _decoder_input(self, z: Tensor, y) -> Tensor:
        return z

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, *input_shape) -> mu (B, Z), logvar (B, Z)."""
        mu, logvar = self.part("heads")(self.encoder(self._encoder_input(x, y)))
        if self.logvar_scale != 1.0:
            logvar = self.logvar_scale * logvar
        if self.logvar_bounds is not None:
            logvar = torch.clamp(logvar, *self.logvar_bounds)
        return mu, logvar

    def decoder_output(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """z (B, Z) -> the likelihood's parameters (B, *input_shape): logits, or the Gaussian's mean."""
        return self.decoder(self._decoder_input(z, y))

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """The mean of p(x | z) (B, *input_shape), as npvae's ``decode``."""
        out = self.decoder_output(z, y)
        return LIKELIHOODS[self.likelihood][1](out.flatten(1)).reshape(out.shape)

    def prior_params(self, n: int, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """mu_p (n, Z), logvar_p (n, Z) of p(z): zeros for N(0, I). (npvae's ``model.prior``; here
        ``prior`` is the CVAE's prior network, as in the state dict.)"""
        p = next(self.parameters())
        zeros = torch.zeros(n, self.latent_dim, dtype=p.dtype, device=p.device)
        return zeros, zeros

    def kl(self, mu: Tensor, logvar: Tensor, y: Tensor | None = None) -> Tensor:
        """KL(q(z|x) || p(z)) per example (B,)."""
        return 0.5 * (mu**2 + torch.exp(logvar) - 1 - logvar).sum(1)

    def forward(self, x: Tensor, y: Tensor | None = None, eps: Tensor | None = None,
                target: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-example ``-log p(target | z)`` (B,) and ``KL`` (B,) for one draw ``eps`` (B, Z) (drawn when None)."""
        mu, logvar = self.encode(x, y)
        z = mu + torch.exp(0.5 * logvar) * self._noise(mu, eps)
        out = self.decoder_output(z, y).flatten(1)
        target = x if target is None else target
        return LIKELIHOODS[self.likelihood][0](out, target.flatten(1)), self.kl(mu, logvar, y)

    def sample(self, n: int, y: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Decode ``n`` draws from the prior: (n, *input_shape)."""
        mu_p, logvar_p = self.prior_params(n, y)
        eps = torch.randn(mu_p.shape, dtype=mu_p.dtype, device=mu_p.device, generator=generator)
        return self.decode(mu_p + torch.exp(0.5 * logvar_p) * eps, y)


class CVAEModule(VAEModule):
    """The conditional VAE: encoder over ``[x, onehot(y)]``, decoder over ``[z, onehot(y)]``, and with a
    learned prior, ``p(z | y)`` from a network over ``onehot(y)``."""

    def __init__(self, spec, parts):
        super().__init__(spec, parts)
        self.num_classes, self.learned_prior = int(spec["config"]["num_classes"]), bool(spec["config"]["learned_prior"])

    def _onehot(self, y: Tensor | None, like: Tensor) -> Tensor:
        if y is None:
            raise ValueError("a CVAE is conditional: pass its labels y, an integer tensor (B,)")
        return F.one_hot(y.long(), self.num_classes).to(like.dtype)

    def _encoder_input(self, x, y):
        return torch.cat([x.flatten(1), self._onehot(y, x)], 1)

    def _decoder_input(self, z, y):
        return torch.cat([z, self._onehot(y, z)], 1)

    def prior_params(self, n, y=None):
        if not self.learned_prior:
            return super().prior_params(n)
        onehot = self._onehot(y, next(self.parameters()))
        return self.part("prior_heads")(self.part("prior")(onehot))

    def kl(self, mu, logvar, y=None):
        if not self.learned_prior:
            return super().kl(mu, logvar)
        mu_p, logvar_p = self.prior_params(len(mu), y)
        delta = logvar - logvar_p
        return 0.5 * (torch.exp(delta) - 1 - delta + (mu - mu_p) ** 2 * torch.exp(-logvar_p)).sum(1)


class AutoencoderModule(NpvaeModule):
    """A deterministic autoencoder: ``recon = sum_j (decoder(encoder(x))_j - target_j)^2``, ``reg = 0``."""

    reg_weight = 1.0

    def encode(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """x (B, *input_shape) -> the code (B, Z)."""
        return self.encoder(x)

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """z (B, Z) -> the decoder's output (B, *input_shape)."""
        return self.decoder(z)

    def _code(self, x: Tensor, eps: Tensor | None) -> tuple[Tensor, Tensor]:
        code = self.encode(x)
        return code, torch.zeros(code.shape[0], dtype=code.dtype, device=code.device)

    def forward(self, x: Tensor, y: Tensor | None = None, eps: Tensor | None = None,
                target: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-example squared error (B,) and regulariser (B,)."""
        code, reg = self._code(x, eps)
        target = x if target is None else target
        return ((self.decode(code) - target) ** 2).flatten(1).sum(1), reg


class DenoisingAutoencoderModule(AutoencoderModule):
    """The denoising autoencoder: the encoder reads a corrupted copy of x, the loss compares with x.

    ``forward(..., corrupted=None)`` corrupts with torch's generator; pass ``corrupted`` to use a given
    corruption (npvae's ``model.corrupt(x, rng)``, to compare the two).
    """

    def __init__(self, spec, parts):
        super().__init__(spec, parts)
        c = spec["config"]
        self.noise, self.noise_level, self.value_range = c["noise"], float(c["noise_level"]), tuple(c["value_range"])
        self.noise_draws = c.get("noise_draws", "fresh")

    def corrupt(self, x: Tensor) -> Tensor:
        if self.noise_draws == "once":  # npvae's fixed copies are drawn by NumPy from each image: not torch's
            raise ValueError("this denoiser trains on one fixed noisy copy per image (noise_draws 'once'); pass "
                             "corrupted=, npvae's model.corrupt(x, None)")
        lo, hi = self.value_range
        if self.noise == "gaussian":
            return torch.clamp(x + torch.randn_like(x) * self.noise_level, lo, hi)
        hit, salt = torch.rand_like(x) < self.noise_level, torch.rand_like(x) < 0.5
        return torch.where(hit, torch.where(salt, torch.full_like(x, hi), torch.full_like(x, lo)), x)

    def forward(self, x, y=None, eps=None, target=None, corrupted: Tensor | None = None):
        code, reg = self._code(self.corrupt(x) if corrupted is None else corrupted, eps)
        target = x if target is None else target
        return ((self.decode(code) - target) ** 2).flatten(1).sum(1), reg


class PoorMansVAEModule(AutoencoderModule):
    """The poor man's VAE: ``z = encoder(x) + noise_std * eps``, ``reg = ||z||_2`` per example, or with
    ``code_penalty="batch"`` each example's share ``||Z||_F / B`` of the batch's one norm."""

    def __init__(self, spec, parts):
        super().__init__(spec, parts)
        self.noise_std = float(spec["config"]["noise_std"])
        self.code_penalty = spec["config"].get("code_penalty", "per_image")

    def _code(self, x, eps):
        h = self.encode(x)
        z = h + self.noise_std * self._noise(h, eps)
        if self.code_penalty == "batch":
            return z, (torch.linalg.vector_norm(z) / z.shape[0]).expand(z.shape[0])
        return z, torch.linalg.vector_norm(z, dim=1)


#: npvae model class name -> the module class that mirrors it.
MODEL_MODULES: dict[str, type[NpvaeModule]] = {
    "VAE": VAEModule, "CVAE": CVAEModule, "Autoencoder": AutoencoderModule,
    "DenoisingAutoencoder": DenoisingAutoencoderModule, "PoorMansVAE": PoorMansVAEModule,
    # the conv presets: the same losses over their conv stacks (the layers cross through LAYERS)
    "ConvVAE": VAEModule, "ConvDenoisingAutoencoder": DenoisingAutoencoderModule, "ConvAutoencoder": AutoencoderModule,
    "ConvDocumentDAE": AutoencoderModule,
}

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


# ----------------------------------------------------------------------------- the two directions


def to_torch(model: Model, dtype: torch.dtype | None = None, device=None) -> NpvaeModule:
    """An ``nn.Module`` with ``model``'s layers, weights (copied) and forward.

    Parameters
    ----------
    model : an npvae model (any preset, or one built from your own layers)
    dtype : torch.dtype, optional
        Default: the model's (float32 or float64).
    device : torch.device or str, optional
        Default: the CPU.

    Returns
    -------
    NpvaeModule
        ``module.state_dict()`` has the keys, order and shapes of ``model.state_dict()``.
    """
    if not isinstance(model, Model):
        raise TypeError(f"to_torch expects an npvae model, got {type(model).__name__}")
    spec = model.spec()
    cls = MODEL_MODULES.get(spec["class"])
    if cls is None:
        raise TypeError(f"npvae.torch has no module for {spec['class']}: add it to npvae.torch.MODEL_MODULES")
    parts = {name: layer_to_torch(part) for name, part in model.parts.items()}
    module = cls({k: v for k, v in spec.items() if k != "parts"}, parts)
    module.to(dtype=dtype or _TORCH_DTYPES[model.dtype], device=device)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()}, strict=True)
    return module


def _check_nothing_shared(module: nn.Module) -> None:
    """Refuse what torch shares and npvae cannot: every npvae layer owns its parameters. A parameter-free
    module used at two places is fine (it computes the same at each, and comes back at each)."""
    first: dict[int, str] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        if id(sub) in first and next(sub.parameters(), None) is not None:
            raise ValueError(f"{path} is the module {first[id(sub)]} again (one {type(sub).__name__} at two places, "
                             "sharing its parameters): npvae's layers own their parameters; use a copy "
                             "(copy.deepcopy) at one place")
        first.setdefault(id(sub), path)
    owners: dict[tuple, str] = {}
    for key, p in module.named_parameters(remove_duplicate=False):
        # one Parameter under two names, or two Parameters over the same memory
        for tag in [("object", id(p))] + ([("memory", str(p.device), p.data_ptr())] if p.numel() else []):
            if tag in owners:
                raise ValueError(f"{key} and {owners[tag]} are one tensor (tied parameters): npvae's parameters are "
                                 f"separate, so the model would untie them; give {key} its own copy "
                                 "(nn.Parameter(p.detach().clone()))")
            owners[tag] = key


def from_torch(module: NpvaeModule, dtype=None) -> Model:
    """The npvae model of a module built by :func:`to_torch` (trained, moved, cast: all fine), with its
    weights copied to the CPU.

    Its parts are read back layer by layer; when they are no longer the preset's (a part replaced
    in torch by other registered layers), the model is rebuilt from those layers (``hidden=None``).

    Parameters
    ----------
    module : NpvaeModule
    dtype : float32 or float64, optional
        Default: float64 when the module's parameters are float64, else float32.

    Returns
    -------
    Model
    """
    if not isinstance(module, NpvaeModule):
        raise TypeError(f"from_torch reads the modules npvae.torch.to_torch builds (they carry the npvae spec), "
                        f"got a {type(module).__name__}; for your own module with npvae's state-dict keys, use "
                        "model.load_state_dict({k: v.detach().cpu().numpy() for k, v in module.state_dict().items()})")
    _check_nothing_shared(module)
    if dtype is None:
        dtype = np.float64 if next(module.parameters()).dtype == torch.float64 else np.float32
    parts = {name: L.layer_spec(layer_from_torch(module.part(name), name)) for name in module.part_names}
    spec = {**module.spec, "parts": parts}
    model = from_spec(spec, dtype=dtype)
    if model.spec()["parts"] != parts and spec["config"].get("hidden") is not None:
        model = from_spec({**spec, "config": {**spec["config"], "hidden": None}}, dtype=dtype)
    built = model.spec()["parts"]
    for name in parts:
        if built.get(name) != parts[name]:
            raise ValueError(f"the module's {name} is {L.layer_from_spec(parts[name])!r}, but a {spec['class']} with "
                             f"these other parts has {model.parts[name]!r} there (npvae builds it from the config)")
    state = {k: v.detach().to("cpu", torch.float64).numpy() for k, v in module.state_dict().items()}
    model.load_state_dict(state)
    return model
