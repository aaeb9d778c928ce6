"""Layers: thin objects over :mod:`npvae.ops` that hold parameter views, a cache and buffers, never math.

The Layer protocol
------------------
A layer maps a batch ``x`` of shape ``(B, *in_shape)`` to ``y`` of shape ``(B, *out_shape)``:

- ``param_shapes() -> {name: shape}``: its parameters (none for activations, Flatten, Reshape);
- ``bind(params, grads, workspace, path)``: attach views into the model's flat parameter and gradient
  buffers (:class:`Parameters`) and the model's :class:`Workspace`; ``path`` (``"encoder.0"``) names
  the layer in state dicts and in the workspace;
- ``init(rng)``: initialise its parameters in place;
- ``output_shape(in_shape) -> out_shape``: per-example shapes, without B; raises ValueError naming
  the layer when ``in_shape`` does not fit;
- ``forward(x) -> y`` keeps what backward needs in ``self.cache``;
- ``backward(dy, need_dx=True) -> dx``: writes (not adds) the parameter gradients and returns
  dL/dx (None when ``need_dx`` is False and the layer can skip it);
- ``output_grad_buffer(batch)``: a ``(B, *out_shape)`` array that ``backward`` reads in place, so a
  loss can write dL/dy straight into it (saves a copy per step);
- ``get_config()`` / ``from_config(config)``: its constructor's arguments as JSON-able data and back
  (Keras' pattern); by default read from the attributes of the same names.

Every layer class registers itself in :data:`LAYER_TYPES` by defining it (``__init_subclass__``), so
that :func:`layer_spec` and :func:`layer_from_spec` (the specs checkpoints store) handle it without
a list of types. :class:`Sequential` composes layers (as ``torch.nn.Sequential``), naming the i-th ``"{i}"``.

Every model keeps all its parameters in one flat buffer and all gradients in a twin flat buffer
(:class:`Parameters`), so an optimizer updates the whole model with one fused kernel and a
checkpoint is one array. Layers take their activations and gradient buffers from the model's
:class:`Workspace`, per batch size, so a training step at a fixed batch size allocates nothing after
the first. The arrays a layer returns are those buffers: they are overwritten by the next call with
the same batch size (copy what you keep).
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict

import numpy as np

from . import conv, ops
from .registry import Registry

DTYPES = (np.float32, np.float64)


def check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"expected dtype float32 or float64, got {dtype}")
    return dtype


def _positive_int(value, name: str) -> int:
    """An integer >= 1; floats such as 1.7 are refused rather than truncated."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"expected {name} a positive integer, got {value!r}")
    return int(value)


def _shape(shape, name: str) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"expected {name} a tuple of positive integers, got {shape!r}") from None
    return tuple(_positive_int(d, name) for d in dims)


class Parameters:
    """Named arrays as views into one flat buffer, with a flat gradient buffer of the same layout.

    Parameters
    ----------
    shapes : dict of name -> shape
        In storage order.
    dtype : float32 or float64
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype=np.float32):
        self.dtype = check_dtype(dtype)
        self.shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
        sizes = [math.prod(shape) for shape in self.shapes.values()]
        self.data = np.zeros(sum(sizes), dtype=self.dtype)  # (P,)
        self.grad = np.zeros(sum(sizes), dtype=self.dtype)  # (P,)
        self._slices = {}
        start = 0
        for name, size in zip(self.shapes, sizes):
            self._slices[name] = slice(start, start + size)
            start += size

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def size(self) -> int:
        """Total number of scalars."""
        return self.data.size

    def value(self, name: str) -> np.ndarray:
        """The parameter ``name`` as a view of the flat buffer."""
        return self.data[self._slices[name]].reshape(self.shapes[name])

    def gradient(self, name: str) -> np.ndarray:
        """The gradient of ``name`` as a view of the flat gradient buffer."""
        return self.grad[self._slices[name]].reshape(self.shapes[name])

    def __repr__(self) -> str:
        return f"Parameters({len(self)} arrays, {self.size:,} scalars, {self.dtype})"


class Workspace:
    """Scratch arrays per batch size, shared by a model and its layers: the one place buffers live.

    ``get(batch, key, shape)`` returns the same array for the same ``(batch, key)`` on every call,
    so a training step at a fixed batch size allocates nothing after the first. Buffers of at most
    ``max_batch_sizes`` batch sizes are kept; the least recently used size is dropped first (an
    evaluation pass over a ragged last batch costs one more size, never a leak).

    Parameters
    ----------
    dtype : float32 or float64
        The default dtype of the buffers.
    max_batch_sizes : int
    """

    def __init__(self, dtype, max_batch_sizes: int = 8):
        self.dtype = check_dtype(dtype)
        self.max_batch_sizes = int(max_batch_sizes)
        self._sizes: OrderedDict[int, dict] = OrderedDict()
        self._last_batch = None
        self._last = None

    def _for(self, batch: int) -> dict:
        if batch == self._last_batch:
            return self._last
        bufs = self._sizes.get(batch)
        if bufs is None:
            while len(self._sizes) >= self.max_batch_sizes:
                self._sizes.popitem(last=False)
            bufs = self._sizes[batch] = {}
        else:
            self._sizes.move_to_end(batch)
        self._last_batch, self._last = batch, bufs
        return bufs

    def get(self, batch: int, key: str, shape: tuple[int, ...], dtype=None) -> np.ndarray:
        """The buffer ``key`` of batch size ``batch``: an uninitialised array of ``shape``."""
        bufs = self._for(batch)
        buf = bufs.get(key)
        if buf is None or buf.shape != shape:
            buf = bufs[key] = np.empty(shape, self.dtype if dtype is None else dtype)
        return buf

    def clear(self) -> None:
        self._sizes.clear()
        self._last_batch = self._last = None

    def __len__(self) -> int:
        """Batch sizes held."""
        return len(self._sizes)

    def __repr__(self) -> str:
        return f"Workspace({len(self)} batch sizes of at most {self.max_batch_sizes}, {self.dtype})"


#: Every layer class by name, as specs name them; each concrete :class:`Layer` subclass registers itself.
LAYER_TYPES: Registry[type] = Registry("layer type")


def _init_parameters(cls) -> dict[str, inspect.Parameter]:
    """The named parameters of ``cls.__init__`` (self aside): a layer's config keys."""
    if cls.__init__ is object.__init__:
        return {}
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY) for p in params):
        raise TypeError(f"{cls.__name__}.__init__ takes *args, **kwargs or positional-only arguments: "
                        "override get_config and from_config")
    return {p.name: p for p in params}


def _json_value(value):
    """A config value as JSON holds it: tuples as lists."""
    return [_json_value(v) for v in value] if isinstance(value, (tuple, list)) else value


class Layer:
    """Base of every layer; see the module docstring for the protocol.

    A parameter-free layer overrides ``output_shape``, ``forward`` and ``backward`` only. Every
    subclass whose name does not start with ``_`` registers itself in :data:`LAYER_TYPES` under its
    class name, so specs can name it (``class Mine(Layer, register=False)`` opts out); its config is
    its constructor's arguments (:meth:`get_config`, :meth:`from_config`, as Keras' layers).
    """

    path = "layer"
    workspace: Workspace | None = None

    def __init_subclass__(cls, register: bool = True, **kwargs):
        super().__init_subclass__(**kwargs)
        if register and not cls.__name__.startswith("_"):
            old = LAYER_TYPES.get(cls.__name__)
            again = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
            LAYER_TYPES.register(cls, name=cls.__name__, replace=again)  # a class defined again replaces itself

    def get_config(self) -> dict:
        """The constructor arguments that rebuild this layer, JSON-able: each ``__init__`` argument read
        from the attribute of the same name (tuples as lists). Override where they differ."""
        config = {}
        for name in _init_parameters(type(self)):
            if not hasattr(self, name):
                raise TypeError(f"{type(self).__name__}.get_config: no attribute {name!r} for the constructor "
                                f"argument {name!r}: keep it under that name, or override get_config")
            config[name] = _json_value(getattr(self, name))
        return config

    @classmethod
    def from_config(cls, config: dict) -> Layer:
        """The layer of a :meth:`get_config` dict; keys checked against the constructor's arguments."""
        params = _init_parameters(cls)
        expected = f"(expected {', '.join(params)})" if params else "(it takes none)"
        for key in config:
            if key not in params:
                raise ValueError(f"layer spec does not fit {cls.__name__}: unknown key {key!r} {expected}")
        for key, param in params.items():
            if param.default is param.empty and key not in config:
                raise ValueError(f"layer spec does not fit {cls.__name__}: missing key {key!r} {expected}")
        return cls(**config)

    def state_items(self, path: str):
        """(state-dict key, value view, gradient view) of each parameter, keys ``{path}.{name}``."""
        for name in self.param_shapes():
            yield f"{path}.{name}", self.params[name], self.grads[name]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def bind(self, params: dict, grads: dict, workspace: Workspace, path: str) -> None:
        """Attach parameter and gradient views (keyed like :meth:`param_shapes`) and the workspace."""
        self.params, self.grads, self.workspace, self.path = params, grads, workspace, path

    def init(self, rng: np.random.Generator) -> None:
        pass

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(in_shape)

    def buffer(self, batch: int, name: str, shape: tuple[int, ...], dtype=None) -> np.ndarray:
        """The layer's buffer ``name`` for batch size ``batch``, from the model's workspace (a fresh
        array for a layer used on its own); ``dtype`` defaults to the workspace's."""
        if self.workspace is None:
            return np.empty(shape, np.float64 if dtype is None else dtype)
        return self.workspace.get(batch, f"{self.path}:{name}", shape, dtype)

    def output_grad_buffer(self, batch: int) -> np.ndarray | None:
        """Where ``backward`` can read dL/dy in place; None when the layer has no such buffer."""
        return None

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Dense(Layer):
    """``y = f(x W^T + b)``, W of shape (O, I) as in PyTorch's ``nn.Linear``; x (B, I) -> y (B, O).

    The activation is fused into the layer (one pass over y, as Keras' ``Dense(activation=...)``);
    the same activations exist as layers of their own (:class:`Activation`).
    Default init is PyTorch's ``nn.Linear`` default: W and b ~ U(-1/sqrt(I), 1/sqrt(I)).

    Parameters
    ----------
    in_dim, out_dim : int
    activation : str, one of :data:`npvae.ops.ACTIVATIONS`
    alpha : float
        LeakyReLU slope.
    """

    def __init__(self, in_dim: int, out_dim: int, activation: str = "identity", alpha: float = 0.01):
        ops.ACTIVATIONS.check(activation)
        self.in_dim, self.out_dim = _positive_int(in_dim, "in_dim"), _positive_int(out_dim, "out_dim")
        self.activation, self.alpha = activation, float(alpha)
        self.weight = self.bias = self.dweight = self.dbias = None
        self.cache = None

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.out_dim, self.in_dim), "bias": (self.out_dim,)}

    def bind(self, params, grads, workspace, path) -> None:
        super().bind(params, grads, workspace, path)
        self.weight, self.bias = params["weight"], params["bias"]
        self.dweight, self.dbias = grads["weight"], grads["bias"]
        self._bias_sums = np.empty(self.out_dim, np.float64)  # scratch of dbias's float64 sums

    def init(self, rng: np.random.Generator) -> None:
        bound = 1.0 / math.sqrt(self.in_dim)
        self.weight[...] = rng.uniform(-bound, bound, self.weight.shape)
        self.bias[...] = rng.uniform(-bound, bound, self.bias.shape)

    def output_shape(self, in_shape):
        if tuple(in_shape) != (self.in_dim,):
            raise ValueError(f"{self.path} {self!r} expects inputs of shape (B, {self.in_dim}), got (B, "
                             f"{', '.join(map(str, in_shape))}){' (add a Flatten layer first)' if len(in_shape) > 1 else ''}")
        return (self.out_dim,)

    def output_grad_buffer(self, batch: int) -> np.ndarray:
        return self.buffer(batch, "da", (batch, self.out_dim))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (B, I) -> y (B, O)."""
        batch = x.shape[0]
        y = self.buffer(batch, "y", (batch, self.out_dim))
        y, self.cache = ops.dense_forward(x, self.weight, self.bias, self.activation, self.alpha, out=y)
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """dy (B, O) -> dx (B, I); writes (not adds) dweight and dbias."""
        batch = dy.shape[0]
        da = self.buffer(batch, "da", (batch, self.out_dim))
        dx = self.buffer(batch, "dx", (batch, self.in_dim)) if need_dx else False
        dx, _, _ = ops.dense_backward(dy, self.cache, dx=dx, dw=self.dweight, db=self.dbias, da=da, work=self._bias_sums)
        return dx

    def __repr__(self) -> str:
        act = "" if self.activation == "identity" else f", {self.activation}"
        return f"Dense({self.in_dim} -> {self.out_dim}{act})"


class GaussianHeads(Dense):
    """The two heads of a diagonal Gaussian, ``[mu, logvar] = x W^T + b``, as one (2Z, I) layer.

    One product instead of two; the state dict exports the halves as two ``nn.Linear`` layers named
    ``names`` (default ``mu`` and ``logvar``). ``forward`` returns the (B, 2Z) buffer; its halves are
    ``mu = y[:, :Z]`` and ``logvar = y[:, Z:]``.
    """

    def __init__(self, in_dim: int, latent_dim: int, names: tuple[str, str] = ("mu", "logvar")):
        self.latent_dim = _positive_int(latent_dim, "latent_dim")
        super().__init__(in_dim, 2 * self.latent_dim)
        if (not isinstance(names, (tuple, list)) or len(names) != 2 or names[0] == names[1]
                or not all(isinstance(n, str) and n for n in names)):
            raise ValueError(f"expected names two different non-empty strings, got {names!r}")
        self.names = tuple(names)

    def state_items(self, path: str):
        """(key, value view, gradient view) of the two heads, in order, keyed by their own names (not ``path``)."""
        z = self.latent_dim
        for head, part in zip(self.names, (slice(None, z), slice(z, None))):
            yield f"{head}.weight", self.weight[part], self.dweight[part]
            yield f"{head}.bias", self.bias[part], self.dbias[part]

    def __repr__(self) -> str:
        return f"GaussianHeads({self.in_dim} -> 2 x {self.latent_dim})"


class Activation(Layer):
    """An elementwise activation as a layer of its own, any shape (B, ...) -> the same shape.

    Parameters
    ----------
    name : str, one of :data:`npvae.ops.ACTIVATIONS`
    alpha : float
        LeakyReLU slope.
    """

    def __init__(self, name: str, alpha: float = 0.01):
        ops.ACTIVATIONS.check(name)
        self.name, self.alpha = name, float(alpha)
        self.cache = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        flat = x.reshape(x.shape[0], -1)  # (B, H)
        y = self.buffer(x.shape[0], "y", flat.shape, flat.dtype)
        y, self.cache = ops.activation_forward(flat, self.name, self.alpha, out=y)
        return y.reshape(x.shape)

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        flat = dy.reshape(dy.shape[0], -1)
        dx = self.buffer(dy.shape[0], "dx", flat.shape, flat.dtype)
        return ops.activation_backward(flat, self.cache, out=dx).reshape(dy.shape)

    def __repr__(self) -> str:
        alpha = f", alpha={self.alpha:g}" if ops.ACTIVATIONS[self.name].takes_alpha else ""
        return f"Activation({self.name!r}{alpha})"


def ReLU() -> Activation:
    return Activation("relu")


def LeakyReLU(alpha: float = 0.01) -> Activation:
    return Activation("leaky_relu", alpha)


def Sigmoid() -> Activation:
    return Activation("sigmoid")


def Tanh() -> Activation:
    return Activation("tanh")


def Softplus() -> Activation:
    return Activation("softplus")


class Flatten(Layer):
    """(B, d1, d2, ...) -> (B, d1 * d2 * ...), a view; backward reshapes back."""

    def output_shape(self, in_shape):
        return (math.prod(in_shape),)

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        return dy.reshape(self.cache)

    def __repr__(self) -> str:
        return "Flatten()"


class Reshape(Layer):
    """(B, ...) -> (B, *shape), a view; backward reshapes back.

    Parameters
    ----------
    shape : tuple of int
        The per-example output shape.
    """

    def __init__(self, shape):
        self.shape = _shape(shape, "shape")

    def output_shape(self, in_shape):
        if math.prod(in_shape) != math.prod(self.shape):
            raise ValueError(f"{self.path} {self!r} cannot reshape inputs of shape (B, {', '.join(map(str, in_shape))}): "
                             f"{math.prod(in_shape)} values per example, the target shape holds {math.prod(self.shape)}")
        return self.shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.cache = x.shape
        return x.reshape(x.shape[0], *self.shape)

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        return dy.reshape(self.cache)

    def __repr__(self) -> str:
        return f"Reshape({self.shape})"


# ----------------------------------------------------------------------------- image layers (NCHW)


def _image_shape(layer, in_shape, channels=None) -> tuple[int, int, int]:
    """``in_shape`` as (C, H, W), or one ValueError naming the layer."""
    if len(in_shape) != 3 or (channels is not None and in_shape[0] != channels):
        want = f"({channels}, H, W)" if channels is not None else "(C, H, W)"
        hint = " (add a Reshape to (C, H, W) first)" if len(in_shape) != 3 else ""
        raise ValueError(f"{layer.path} {layer!r} expects images of shape (B, {want[1:]}, got "
                         f"(B, {', '.join(map(str, in_shape))}){hint}")
    return tuple(in_shape)


def _layer_shape(layer, fn, in_shape, *args):
    """``fn(in_shape, *args)`` with its ValueError prefixed by the layer's path and repr."""
    try:
        return tuple(fn(in_shape, *args))
    except ValueError as exc:
        raise ValueError(f"{layer.path} {layer!r} on inputs (B, {', '.join(map(str, in_shape))}): {exc}") from None


def _padding_arg(padding):
    """A padding as stored in specs: a string, an int, or a pair (lists from JSON become tuples)."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, (list, tuple)):
        return tuple(padding)
    return padding


class _ConvBase(Layer):
    """What Conv2d and ConvTranspose2d share: parameters, torch's default init, the fused activation."""

    transposed = False

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, activation="identity",
                 alpha=0.01):
        name = type(self).__name__
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.kernel_size = conv.as_pair(kernel_size, "kernel_size", name, 1)
        self.stride = conv.as_pair(stride, "stride", name, 1)
        self.padding = _padding_arg(padding)
        conv.conv_pads(self.padding, self.kernel_size, self.kernel_size, self.stride, name)  # a padding it knows
        ops.ACTIVATIONS.check(activation)
        self.activation, self.alpha = activation, float(alpha)
        self.weight = self.bias = self.dweight = self.dbias = None
        self.cache = self._act_cache = None

    def param_shapes(self):
        c = (self.in_channels, self.out_channels) if self.transposed else (self.out_channels, self.in_channels)
        return {"weight": (*c, *self.kernel_size), "bias": (self.out_channels,)}

    def bind(self, params, grads, workspace, path) -> None:
        super().bind(params, grads, workspace, path)
        self.weight, self.bias = params["weight"], params["bias"]
        self.dweight, self.dbias = grads["weight"], grads["bias"]

    def init(self, rng: np.random.Generator) -> None:
        """PyTorch's default: kaiming_uniform(a=sqrt(5)) for W and U(+-1/sqrt(fan_in)) for b, both
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = weight.shape[1] * kH * kW (as torch computes it,
        which for a transposed convolution's (C_in, C_out, kH, kW) weight is C_out kH kW)."""
        bound = 1.0 / math.sqrt(self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1])
        self.weight[...] = rng.uniform(-bound, bound, self.weight.shape)
        self.bias[...] = rng.uniform(-bound, bound, self.bias.shape)

    def _buffers(self, batch):
        return lambda name, shape, dtype: self.buffer(batch, name, shape, dtype)

    def _activate(self, y):
        """The bias and the activation in one pass over y (the op ran without the bias)."""
        zeros = self.buffer(y.shape[0], "zeros", (y.shape[2] * y.shape[3],), y.dtype)
        zeros.fill(0)
        _, self._act_cache = conv.bias_activation_forward(y, self.bias, self.activation, self.alpha, zeros)
        return y

    def output_grad_buffer(self, batch: int):
        shape = getattr(self, "_out_shape", None)
        return None if shape is None else self.buffer(batch, "da", (batch, *shape), self.weight.dtype)

    def _da(self, dy):
        """dL/d(pre-activation), in the layer's ``da`` buffer (which may be dy itself)."""
        if self.activation == "identity":
            return dy
        da = self.buffer(dy.shape[0], "da", dy.shape, dy.dtype)
        ops.activation_backward(dy.reshape(dy.shape[0], -1), self._act_cache, out=da.reshape(dy.shape[0], -1))
        return da

    def _describe(self) -> str:
        k, s = self.kernel_size, self.stride
        parts = [f"{self.in_channels} -> {self.out_channels}", f"{k[0]}x{k[1]}"]
        if s != (1, 1):
            parts.append(f"stride {s[0] if s[0] == s[1] else s}")
        if self.padding not in (0, "valid"):
            parts.append(f"padding {self.padding!r}")
        return ", ".join(parts)


class Conv2d(_ConvBase):
    """``y = f(conv2d(x, W) + b)``, W of shape (C_out, C_in, kH, kW) as ``torch.nn.Conv2d``;
    x (B, C_in, H, W) -> y (B, C_out, OH, OW). See :func:`npvae.conv.conv2d_forward`.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride : int or pair
    padding : int, pair, ``"valid"`` or ``"same"`` (Keras' split: the odd pixel at the bottom/right)
    activation : str, one of :data:`npvae.ops.ACTIVATIONS`, fused (one pass over y)
    alpha : float
        LeakyReLU slope.
    """

    def output_shape(self, in_shape):
        _image_shape(self, in_shape, self.in_channels)
        shape = _layer_shape(self, conv.conv2d_output_shape, tuple(in_shape), self.out_channels, self.kernel_size,
                             self.stride, self.padding)
        self._out_shape = shape
        return shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (B, C_in, H, W) -> y (B, C_out, OH, OW)."""
        batch = x.shape[0]
        shape = conv.conv2d_output_shape(x.shape[1:], self.out_channels, self.kernel_size, self.stride, self.padding)
        y = self.buffer(batch, "y", (batch, *shape), x.dtype)
        y, self.cache = conv.conv2d_forward(x, self.weight, None, self.stride, self.padding, out=y,
                                            buffers=self._buffers(batch))
        return self._activate(y)

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """dy (B, C_out, OH, OW) -> dx (B, C_in, H, W); writes (not adds) dweight and dbias."""
        dx, _, _ = conv.conv2d_backward(self._da(dy), self.cache, need_dx, dw=self.dweight, db=self.dbias)
        return dx

    def __repr__(self) -> str:
        act = "" if self.activation == "identity" else f", {self.activation}"
        return f"Conv2d({self._describe()}{act})"


class ConvTranspose2d(_ConvBase):
    """``y = f(conv_transpose2d(x, W) + b)``, W of shape (C_in, C_out, kH, kW) as
    ``torch.nn.ConvTranspose2d``; x (B, C_in, H, W) -> y (B, C_out, OH, OW) with
    ``OH = (H - 1) sH + kH - 2 padding + output_padding``, or ``H sH`` for Keras' ``"same"``.
    See :func:`npvae.conv.conv_transpose2d_forward`.
    """

    transposed = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 activation="identity", alpha=0.01):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, activation, alpha)
        self.output_padding = conv.as_pair(output_padding, "output_padding", "ConvTranspose2d", 0)
        conv.transpose_crops(self.padding, self.output_padding, self.kernel_size, self.stride, "ConvTranspose2d")

    def output_shape(self, in_shape):
        _image_shape(self, in_shape, self.in_channels)
        shape = _layer_shape(self, conv.conv_transpose2d_output_shape, tuple(in_shape), self.out_channels,
                             self.kernel_size, self.stride, self.padding, self.output_padding)
        self._out_shape = shape
        return shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (B, C_in, H, W) -> y (B, C_out, OH, OW)."""
        y, self.cache = conv.conv_transpose2d_forward(x, self.weight, None, self.stride, self.padding,
                                                      self.output_padding, buffers=self._buffers(x.shape[0]))
        return self._activate(y)

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """dy (B, C_out, OH, OW) -> dx (B, C_in, H, W); writes (not adds) dweight and dbias."""
        dx, _, _ = conv.conv_transpose2d_backward(self._da(dy), self.cache, need_dx, dw=self.dweight, db=self.dbias)
        return dx

    def __repr__(self) -> str:
        act = "" if self.activation == "identity" else f", {self.activation}"
        extra = f", output_padding {self.output_padding}" if self.output_padding != (0, 0) else ""
        return f"ConvTranspose2d({self._describe()}{extra}{act})"


class MaxPool2d(Layer):
    """Max pooling, (B, C, H, W) -> (B, C, OH, OW), as ``torch.nn.MaxPool2d`` (``padding`` an int or
    pair, at most half the kernel) or Keras' ``MaxPooling2D`` (``padding="same"``). Ties go to the
    first maximum in the window's row-major order, as in PyTorch. See :func:`npvae.conv.max_pool2d_forward`.
    """

    def __init__(self, kernel_size=2, stride=None, padding=0):
        self.kernel_size = conv.as_pair(kernel_size, "kernel_size", "MaxPool2d", 1)
        self.stride = self.kernel_size if stride is None else conv.as_pair(stride, "stride", "MaxPool2d", 1)
        self.padding = _padding_arg(padding)
        conv.pool_pads(self.padding, self.kernel_size, self.kernel_size, self.stride, "MaxPool2d")
        self.cache = None

    def output_shape(self, in_shape):
        _image_shape(self, in_shape)
        return _layer_shape(self, conv.max_pool2d_output_shape, tuple(in_shape), self.kernel_size, self.stride,
                            self.padding)

    def forward(self, x: np.ndarray) -> np.ndarray:
        batch = x.shape[0]
        shape = (batch, *conv.max_pool2d_output_shape(x.shape[1:], self.kernel_size, self.stride, self.padding))
        out = self.buffer(batch, "y", shape, x.dtype)
        argmax = self.buffer(batch, "argmax", shape, np.int64)
        y, self.cache = conv.max_pool2d_forward(x, self.kernel_size, self.stride, self.padding, out=out, argmax=argmax)
        self._x_shape = x.shape
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        dx = self.buffer(dy.shape[0], "dx", self._x_shape, dy.dtype)
        return conv.max_pool2d_backward(dy, self.cache, out=dx)

    def __repr__(self) -> str:
        k, s = self.kernel_size, self.stride
        extra = "" if s == k else f", stride {s}"
        extra += "" if self.padding in (0, "valid") else f", padding {self.padding!r}"
        return f"MaxPool2d({k[0]}x{k[1]}{extra})"


class Upsample2d(Layer):
    """Nearest-neighbour upsampling by integer factors, (B, C, H, W) -> (B, C, H sH, W sW), as Keras'
    ``UpSampling2D`` and ``torch.nn.Upsample(scale_factor=s, mode="nearest")``."""

    def __init__(self, scale=2):
        self.scale = conv.as_pair(scale, "scale", "Upsample2d", 1)
        self.cache = None

    def output_shape(self, in_shape):
        c, h, w = _image_shape(self, in_shape)
        return (c, h * self.scale[0], w * self.scale[1])

    def forward(self, x: np.ndarray) -> np.ndarray:
        batch, (sh, sw) = x.shape[0], self.scale
        out = self.buffer(batch, "y", (batch, x.shape[1], x.shape[2] * sh, x.shape[3] * sw), x.dtype)
        y, self.cache = conv.upsample_nearest2d_forward(x, self.scale, out=out)
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        b, c, h, w = dy.shape
        dx = self.buffer(b, "dx", (b, c, h // self.scale[0], w // self.scale[1]), dy.dtype)
        return conv.upsample_nearest2d_backward(dy, self.cache, out=dx)

    def __repr__(self) -> str:
        s = self.scale
        return f"Upsample2d({s[0] if s[0] == s[1] else s})"


class Sequential(Layer):
    """Layers applied in order, as ``torch.nn.Sequential``; the i-th is named ``"{i}"``.

    >>> Sequential(Flatten(), Dense(784, 400, "relu"), Dense(400, 20))
    Sequential(Flatten(), Dense(784 -> 400, relu), Dense(400 -> 20))
    """

    def __init__(self, *layers: Layer):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is a {type(layer).__name__}, not an npvae layer")
        self.layers = list(layers)
        for i, layer in enumerate(self.layers):  # a name for errors before a model binds it ("encoder.1")
            if layer.path == Layer.path:
                layer.path = f"layer {i}"
        holders = [i for i, layer in enumerate(self.layers) if layer.param_shapes() or getattr(layer, "has_params", False)]
        self._first_holder = holders[0] if holders else None  # backward without dx stops here

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def named_layers(self, prefix: str):
        """(path, layer) of every parameter-holding leaf, depth first: ``prefix.0``, ``prefix.1.0``, ..."""
        for i, layer in enumerate(self.layers):
            path = f"{prefix}.{i}"
            if isinstance(layer, Sequential):
                yield from layer.named_layers(path)
            else:
                yield path, layer

    def bind(self, params, grads, workspace, path) -> None:
        self.workspace, self.path = workspace, path

    def output_shape(self, in_shape):
        for layer in self.layers:
            in_shape = layer.output_shape(in_shape)
        return tuple(in_shape)

    def output_grad_buffer(self, batch: int):
        return self.layers[-1].output_grad_buffer(batch) if self.layers else None

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    @property
    def has_params(self) -> bool:
        """Whether any layer in the stack holds parameters."""
        return self._first_holder is not None

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """Backward through the stack; with ``need_dx`` False, layers below the first one with
        parameters are skipped and None is returned."""
        first = 0
        if not need_dx:
            if self._first_holder is None:
                return None
            first = self._first_holder
        for i in range(len(self.layers) - 1, first - 1, -1):
            dy = self.layers[i].backward(dy, need_dx=need_dx or i > first)
        return None if not need_dx else dy

    def get_config(self) -> dict:
        return {"layers": [layer_spec(layer) for layer in self.layers]}

    @classmethod
    def from_config(cls, config: dict) -> Sequential:
        if set(config) != {"layers"} or not isinstance(config["layers"], list):
            raise ValueError(f"expected a Sequential spec with one key, 'layers', a list of layer specs; got keys "
                             f"{', '.join(map(repr, config)) or 'none'}")
        return cls([layer_from_spec(child) for child in config["layers"]])

    def __repr__(self) -> str:
        return "Sequential(" + ", ".join(map(repr, self.layers)) + ")"


def mlp(sizes, activation: str = "relu", out_activation: str = "identity", alpha: float = 0.01) -> Sequential:
    """Dense layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``: hidden layers use ``activation``,
    the last ``out_activation``."""
    sizes = [_positive_int(s, "layer size") for s in sizes]
    if len(sizes) < 2:
        raise ValueError(f"expected at least two layer sizes, got {sizes}")
    acts = [activation] * (len(sizes) - 2) + [out_activation]
    return Sequential([Dense(i, o, a, alpha) for i, o, a in zip(sizes[:-1], sizes[1:], acts)])


# ----------------------------------------------------------------------------- specs: layers as JSON


def layer_spec(layer: Layer) -> dict:
    """A JSON-able description of ``layer``, ``{"type": class name, **layer.get_config()}``, read by
    :func:`layer_from_spec`."""
    name = type(layer).__name__
    if LAYER_TYPES.get(name) is not type(layer):
        raise TypeError(f"{name} has no spec: it is not the layer type {name!r} of npvae.layers.LAYER_TYPES "
                        "(a class declared with register=False, or another class took the name)")
    return {"type": name, **layer.get_config()}


def layer_from_spec(spec) -> Layer:
    """Rebuild a layer from :func:`layer_spec`'s description. A spec is data, never code: only the
    classes in :data:`LAYER_TYPES` are built, from config keys their constructors take."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise ValueError(f"expected a layer spec, a dict with a 'type', got {type(spec).__name__}")
    cls = LAYER_TYPES[spec["type"]]
    try:
        return cls.from_config({k: v for k, v in spec.items() if k != "type"})
    except TypeError as exc:
        raise ValueError(f"layer spec does not fit {cls.__name__}: {exc}") from None
