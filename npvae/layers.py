"""Thin layer classes over :mod:`npvae.ops`: they hold parameter views and buffers, never math.

Every model keeps all its parameters in one flat buffer and all gradients in a twin flat buffer
(:class:`Parameters`); a layer's ``weight``/``bias`` and ``dweight``/``dbias`` are views into them,
so an optimizer updates the whole model with one fused kernel and a checkpoint is one array.

Layers keep their activations and gradient buffers per batch size, so a training step at a fixed
batch size allocates nothing after the first. The arrays a layer returns are those buffers: they
are overwritten by the next call with the same batch size (copy what you keep).
"""

from __future__ import annotations

import math

import numpy as np

from . import ops

DTYPES = (np.float32, np.float64)


def check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"expected dtype float32 or float64, got {dtype}")
    return dtype


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


class Dense:
    """``y = f(x W^T + b)``, W of shape (O, I) as in PyTorch's ``nn.Linear``.

    Default init is PyTorch's ``nn.Linear`` default: W and b ~ U(-1/sqrt(I), 1/sqrt(I)).

    Parameters
    ----------
    in_dim, out_dim : int
    activation : str, one of :data:`npvae.ops.ACTIVATIONS`
    alpha : float
        LeakyReLU slope.
    """

    def __init__(self, in_dim: int, out_dim: int, activation: str = "identity", alpha: float = 0.01):
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: expected one of {', '.join(ops.ACTIVATIONS)}")
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.activation, self.alpha = activation, float(alpha)
        self.weight = self.bias = self.dweight = self.dbias = None
        self._cache = None
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.out_dim, self.in_dim), "bias": (self.out_dim,)}

    def bind(self, weight, bias, dweight, dbias) -> None:
        """Attach parameter and gradient views (from :class:`Parameters`)."""
        self.weight, self.bias, self.dweight, self.dbias = weight, bias, dweight, dbias
        self._bias_sums = np.empty(self.out_dim, np.float64)  # scratch of dbias's float64 sums
        self._buffers.clear()

    def init(self, rng: np.random.Generator) -> None:
        bound = 1.0 / math.sqrt(self.in_dim)
        self.weight[...] = rng.uniform(-bound, bound, self.weight.shape)
        self.bias[...] = rng.uniform(-bound, bound, self.bias.shape)

    def _workspace(self, batch: int):
        if batch not in self._buffers:
            dtype = self.weight.dtype
            self._buffers[batch] = (
                np.empty((batch, self.out_dim), dtype),  # y
                np.empty((batch, self.out_dim), dtype),  # da
                np.empty((batch, self.in_dim), dtype),  # dx
            )
        return self._buffers[batch]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (B, I) -> y (B, O)."""
        y, _, _ = self._workspace(x.shape[0])
        y, self._cache = ops.dense_forward(x, self.weight, self.bias, self.activation, self.alpha, out=y)
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """dy (B, O) -> dx (B, I); writes (not adds) dweight and dbias."""
        _, da, dx = self._workspace(dy.shape[0])
        dx, _, _ = ops.dense_backward(
            dy, self._cache, dx=dx if need_dx else False, dw=self.dweight, db=self.dbias, da=da, work=self._bias_sums
        )
        return dx

    def __repr__(self) -> str:
        act = "" if self.activation == "identity" else f", {self.activation}"
        return f"Dense({self.in_dim} -> {self.out_dim}{act})"


class MLP:
    """A stack of :class:`Dense` layers: ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``.

    Hidden layers use ``activation``; the last layer uses ``out_activation``.
    """

    def __init__(self, sizes, activation="relu", out_activation="identity", alpha=0.01):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"expected at least two positive layer sizes, got {sizes}")
        acts = [activation] * (len(sizes) - 2) + [out_activation]
        self.layers = [Dense(i, o, a, alpha) for i, o, a in zip(sizes[:-1], sizes[1:], acts)]

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        for k, layer in enumerate(reversed(self.layers)):
            dy = layer.backward(dy, need_dx=need_dx or k < len(self.layers) - 1)
        return dy

    def output_grad_buffer(self, batch: int) -> np.ndarray:
        """A (B, O) buffer for dL/d(output) that the last layer's backward reads in place."""
        return self.layers[-1]._workspace(batch)[1]

    def __repr__(self) -> str:
        return "MLP(" + ", ".join(map(repr, self.layers)) + ")"
