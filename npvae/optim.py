"""Optimizers that update one flat parameter buffer in place, step for step like ``torch.optim``.

A model keeps all its parameters in one contiguous 1-D array ``params`` and all gradients in a second
array ``grads`` of the same size and dtype; per-layer arrays are views into them. An optimizer holds
those two buffers, and ``step()`` runs one fused kernel (:mod:`npvae._kernels`) over them: no
allocation per step under the Numba backend. The scalars of a step (bias corrections, ``-lr``) are
computed once in Python, in the same order as ``torch.optim``'s single-tensor code, and cast to the
parameters' dtype before the kernel sees them, so float32 training stays float32.

``state_dict()`` returns plain arrays and numbers (hyperparameters, ``step``, state buffers), ready
for :func:`npvae.checkpoint.save_checkpoint`; ``load_state_dict`` checks keys and shapes first.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from . import _kernels

StateDict = dict[str, "np.ndarray | float | int"]


def _check_flat(name: str, a: np.ndarray) -> None:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"expected {name} to be a NumPy array, got {type(a).__name__}")
    if a.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected {name} of dtype float32 or float64, got {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"expected {name} to be the flat 1-D buffer, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"expected {name} to be contiguous; pass the flat buffer, not a strided view")
    if not a.flags.writeable:
        raise ValueError(f"expected {name} to be writeable")


def _check_buffers(params: np.ndarray, grads: np.ndarray) -> None:
    _check_flat("params", params)
    _check_flat("grads", grads)
    if params.shape != grads.shape or params.dtype != grads.dtype:
        raise ValueError(
            f"params and grads must match: params is {params.dtype} {params.shape}, "
            f"grads is {grads.dtype} {grads.shape}"
        )
    if np.may_share_memory(params, grads):
        raise ValueError("params and grads must be separate buffers, got overlapping arrays")


def _number(name: str, value, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> float:
    """``value`` as a float, checked to lie in [low, high] (or [low, high) when ``high_open``)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"expected {name} to be a number, got {value!r}") from None
    if not (math.isfinite(x) and low <= x and (x < high if high_open else x <= high)):
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"expected {name} in {bound} and finite, got {value!r}")
    return x


def _scalar(name: str, value) -> np.ndarray:
    a = np.asarray(value)
    if a.shape != () or a.dtype.kind not in "biuf":
        raise ValueError(f"optimizer state {name!r}: expected a number, got {a.dtype} array of shape {a.shape}")
    return a


class Optimizer:
    """Base class: holds the flat ``params``/``grads`` buffers, counts steps, saves and restores state.

    Parameters
    ----------
    params : ndarray, shape (N,), float32 or float64
        The model's flat parameter buffer, updated in place by :meth:`step`.
    grads : ndarray, shape (N,), same dtype
        The flat gradient buffer, read (never written) by :meth:`step`.
    lr : float
        Learning rate, >= 0 (0 allowed, so warm-up schedules may start there). Settable between steps.

    Notes
    -----
    Subclasses list their float hyperparameters in ``_hyper`` and their structural switches in
    ``_flags`` (fixed at construction: they decide which state buffers exist), validate and set them
    in ``_configure``, allocate ``_state`` buffers, and implement ``_update(t)`` for step number t.
    """

    _hyper: tuple[str, ...] = ()
    _flags: tuple[str, ...] = ()

    def __init__(self, params: np.ndarray, grads: np.ndarray, lr: float):
        _check_buffers(params, grads)
        self.params = params
        self.grads = grads
        self.lr = lr
        self.step_count = 0
        self._state: dict[str, np.ndarray] = {}
        # Scratch for the NumPy twins of the kernels, allocated once; the Numba loops do not use it.
        self._work = np.empty((2, params.shape[0]), dtype=params.dtype)
        self._absent = np.empty(0, dtype=params.dtype)  # stands in for a state buffer not in use

    @property
    def lr(self) -> float:
        """Learning rate; set it between steps to follow a schedule."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _number("lr", value)

    def _configure(self, **hyper) -> None:
        raise NotImplementedError

    def _update(self, t: int) -> None:
        raise NotImplementedError

    def step(self) -> None:
        """Update ``params`` in place from ``grads`` (one optimizer step)."""
        t = self.step_count + 1
        self._update(t)
        self.step_count = t

    def zero_grad(self) -> None:
        """Set every gradient to zero, in place."""
        self.grads.fill(0)

    def _buffer(self, name: str) -> np.ndarray:
        return self._state.get(name, self._absent)

    def state_dict(self) -> StateDict:
        """Hyperparameters, switches (as 0/1), ``step`` and copies of the state buffers.

        Returns
        -------
        dict
            ``{"lr": float, <hyperparameters>: float, <switches>: int, "step": int,
            <buffer>: ndarray (N,)}``: plain numbers and arrays only, so it fits in an .npz.
        """
        state: StateDict = {"lr": self.lr}
        state.update({name: float(getattr(self, name)) for name in self._hyper})
        state.update({name: int(getattr(self, name)) for name in self._flags})
        state["step"] = self.step_count
        state.update({name: buf.copy() for name, buf in self._state.items()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray | float | int]) -> None:
        """Restore hyperparameters, step count and state buffers saved by :meth:`state_dict`.

        Numbers may arrive as 0-d arrays (as they come back from an .npz). Everything is checked
        before anything changes: on error the optimizer is left as it was.

        Raises
        ------
        ValueError
            On missing or unexpected keys, a switch that differs from this optimizer's, a buffer of
            the wrong shape or kind, or an invalid hyperparameter.
        """
        kind = type(self).__name__
        expected = {"lr", "step", *self._hyper, *self._flags, *self._state}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{kind} state_dict does not match this optimizer (a different optimizer, or a different "
                f"momentum/amsgrad/centered setting?): missing keys {missing}, unexpected keys {unexpected}"
            )
        for name in self._flags:
            saved = bool(_scalar(name, state[name]))
            if saved != bool(getattr(self, name)):
                raise ValueError(
                    f"{kind} state_dict was saved with {name}={saved}, this optimizer has "
                    f"{name}={bool(getattr(self, name))}; build it with the same setting"
                )
        step = _scalar("step", state["step"])
        if step.dtype.kind == "f" and step != np.floor(step) or step < 0:
            raise ValueError(f"optimizer state 'step': expected a non-negative integer, got {step}")
        n = self.params.shape[0]
        for name in self._state:
            buf = np.asarray(state[name])
            if buf.shape != (n,) or buf.dtype.kind != "f":
                raise ValueError(
                    f"optimizer state {name!r}: expected a float array of shape ({n},), got {buf.dtype} {buf.shape}"
                )
        hyper = {name: float(_scalar(name, state[name])) for name in ("lr", *self._hyper)}
        lr = hyper.pop("lr")
        previous = {name: getattr(self, name) for name in self._hyper}
        self._configure(**hyper)  # validates, then sets
        try:
            self.lr = lr
        except ValueError:
            self._configure(**previous)
            raise
        self.step_count = int(step)
        for name, buf in self._state.items():
            np.copyto(buf, state[name], casting="same_kind")

    def _hyper_repr(self) -> str:
        items = [f"lr={self.lr:g}"] + [f"{name}={getattr(self, name)!r}" for name in self._hyper + self._flags]
        return ", ".join(items)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(N={self.params.shape[0]}, dtype={self.params.dtype}, "
            f"{self._hyper_repr()}, step={self.step_count})"
        )


class SGD(Optimizer):
    r"""Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    Parameters
    ----------
    params, grads : ndarray, shape (N,)
        Flat parameter and gradient buffers (see :class:`Optimizer`).
    lr : float
        Learning rate.
    momentum : float, default 0
        Momentum factor, >= 0. Nonzero allocates ``momentum_buffer``.
    dampening : float, default 0
        Dampening for momentum.
    nesterov : bool, default False
        Nesterov momentum (needs momentum > 0 and dampening = 0).
    weight_decay : float, default 0
        L2 penalty, added to the gradient.

    Notes
    -----
    With g = grad + weight_decay p, on step t:

    .. math::
        b_1 = g_1, \quad b_t = \mu b_{t-1} + (1 - \tau) g_t \quad (t > 1)

        p_t = p_{t-1} - \mathrm{lr} \, (g_t + \mu b_t \text{ if nesterov else } b_t)
    """

    _hyper = ("momentum", "dampening", "weight_decay")
    _flags = ("nesterov",)

    def __init__(self, params, grads, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, grads, lr)
        self.nesterov = bool(nesterov)
        self._configure(momentum=momentum, dampening=dampening, weight_decay=weight_decay)
        if self.momentum != 0:
            self._state["momentum_buffer"] = np.zeros_like(params)

    def _configure(self, momentum, dampening, weight_decay):
        momentum = _number("momentum", momentum)
        dampening = _number("dampening", dampening, low=-math.inf)
        weight_decay = _number("weight_decay", weight_decay)
        if self.nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                "Nesterov momentum needs momentum > 0 and dampening = 0, "
                f"got momentum={momentum}, dampening={dampening}"
            )
        self.momentum, self.dampening, self.weight_decay = momentum, dampening, weight_decay

    def _update(self, t):
        dt = self.params.dtype.type
        _kernels.sgd_step(
            self.params, self.grads, self._buffer("momentum_buffer"), dt(-self.lr), dt(self.weight_decay),
            dt(self.momentum), dt(1 - self.dampening), self.nesterov, t == 1, self._work,
        )


class RMSprop(Optimizer):
    r"""RMSprop, as ``torch.optim.RMSprop``.

    Parameters
    ----------
    params, grads : ndarray, shape (N,)
        Flat parameter and gradient buffers (see :class:`Optimizer`).
    lr : float, default 1e-2
        Learning rate.
    alpha : float, default 0.99
        Smoothing constant of the squared-gradient average.
    eps : float, default 1e-8
        Added to the root mean square.
    weight_decay : float, default 0
        L2 penalty, added to the gradient.
    momentum : float, default 0
        Momentum factor, >= 0. Positive allocates ``momentum_buffer``.
    centered : bool, default False
        Normalise by an estimate of the gradient's variance (allocates ``grad_avg``).

    Notes
    -----
    With g = grad + weight_decay p:

    .. math::
        s \leftarrow \alpha s + (1 - \alpha) g^2, \quad
        a \leftarrow \alpha a + (1 - \alpha) g, \quad
        r = \sqrt{s - a^2 \text{ (centered) or } s} + \epsilon

        b \leftarrow \mu b + g / r, \quad p \leftarrow p - \mathrm{lr}\, b
        \quad (\mu > 0; \text{ else } p \leftarrow p - \mathrm{lr}\, g / r)
    """

    _hyper = ("alpha", "eps", "weight_decay", "momentum")
    _flags = ("centered",)

    def __init__(self, params, grads, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False):
        super().__init__(params, grads, lr)
        self.centered = bool(centered)
        self._configure(alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum)
        self._state["square_avg"] = np.zeros_like(params)
        if self.centered:
            self._state["grad_avg"] = np.zeros_like(params)
        if self.momentum > 0:
            self._state["momentum_buffer"] = np.zeros_like(params)

    def _configure(self, alpha, eps, weight_decay, momentum):
        alpha = _number("alpha", alpha)
        eps = _number("eps", eps)
        weight_decay = _number("weight_decay", weight_decay)
        momentum = _number("momentum", momentum)
        self.alpha, self.eps, self.weight_decay, self.momentum = alpha, eps, weight_decay, momentum

    def _update(self, t):
        dt = self.params.dtype.type
        one_minus_alpha = dt(1 - self.alpha)  # torch's lerp weight, in the parameters' dtype
        _kernels.rmsprop_step(
            self.params, self.grads, self._state["square_avg"], self._buffer("grad_avg"),
            self._buffer("momentum_buffer"), dt(-self.lr), dt(self.alpha), one_minus_alpha,
            dt(1) - one_minus_alpha, bool(abs(one_minus_alpha) < 0.5), dt(self.eps), dt(self.weight_decay),
            dt(self.momentum), self.centered, self._work,
        )


class Adam(Optimizer):
    r"""Adam, as ``torch.optim.Adam`` (weight decay is an L2 term added to the gradient).

    Parameters
    ----------
    params, grads : ndarray, shape (N,)
        Flat parameter and gradient buffers (see :class:`Optimizer`).
    lr : float, default 1e-3
        Learning rate.
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the first and second moment averages, each in [0, 1).
    eps : float, default 1e-8
        Added to the bias-corrected root of the second moment.
    weight_decay : float, default 0
        L2 penalty added to the gradient (decoupled in :class:`AdamW`).
    amsgrad : bool, default False
        Normalise by the running maximum of the second moment (allocates ``max_exp_avg_sq``).

    Notes
    -----
    With g = grad + weight_decay p and step t:

    .. math::
        m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad v \leftarrow \beta_2 v + (1 - \beta_2) g^2

        p \leftarrow p - \frac{\mathrm{lr}}{1 - \beta_1^t} \,
        \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}

    computed in torch's order: ``step_size = lr / (1 - beta1**t)``,
    ``denom = sqrt(v) / (1 - beta2**t)**0.5 + eps``, ``p += (-step_size * m) / denom``.
    """

    _hyper = ("beta1", "beta2", "eps", "weight_decay")
    _flags = ("amsgrad", "decoupled_weight_decay")
    decoupled_weight_decay = False

    def __init__(self, params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False):
        super().__init__(params, grads, lr)
        self.amsgrad = bool(amsgrad)
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"expected betas to be a pair (beta1, beta2), got {betas!r}") from None
        self._configure(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        self._state["exp_avg"] = np.zeros_like(params)
        self._state["exp_avg_sq"] = np.zeros_like(params)
        if self.amsgrad:
            self._state["max_exp_avg_sq"] = np.zeros_like(params)

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)

    def _configure(self, beta1, beta2, eps, weight_decay):
        beta1 = _number("betas[0]", beta1, high=1.0, high_open=True)
        beta2 = _number("betas[1]", beta2, high=1.0, high_open=True)
        eps = _number("eps", eps)
        weight_decay = _number("weight_decay", weight_decay)
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay

    def _update(self, t):
        dt = self.params.dtype.type
        bias_correction1 = 1 - self.beta1**t
        bias_correction2 = 1 - self.beta2**t
        step_size = self.lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        w1 = dt(1 - self.beta1)  # torch's lerp weight, in the parameters' dtype
        if self.decoupled_weight_decay:
            l2, decay = dt(0), dt(1 - self.lr * self.weight_decay)
        else:
            l2, decay = dt(self.weight_decay), dt(1)
        _kernels.adam_step(
            self.params, self.grads, self._state["exp_avg"], self._state["exp_avg_sq"],
            self._buffer("max_exp_avg_sq"), w1, dt(1) - w1, bool(abs(w1) < 0.5), dt(self.beta2),
            dt(1 - self.beta2), dt(-step_size), dt(bias_correction2_sqrt), dt(self.eps), l2, decay,
            self.amsgrad, self._work,
        )


class AdamW(Adam):
    r"""Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    Parameters as :class:`Adam`, except ``weight_decay`` (default 1e-2) shrinks the parameters
    directly before the Adam update, instead of entering the gradient:

    .. math::
        p \leftarrow (1 - \mathrm{lr} \, \lambda) \, p, \text{ then the Adam step with } g = \mathrm{grad}.
    """

    decoupled_weight_decay = True

    def __init__(self, params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, grads, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


def clip_grad_norm(grads: np.ndarray, max_norm: float) -> float:
    r"""Scale ``grads`` in place so its L2 norm is at most ``max_norm``, as ``torch.nn.utils.clip_grad_norm_``.

    Parameters
    ----------
    grads : ndarray, shape (N,), float32 or float64
        Flat gradient buffer.
    max_norm : float
        Largest allowed norm, > 0.

    Returns
    -------
    float
        The norm before clipping, ``||grads||_2`` (accumulated in float64).

    Notes
    -----
    .. math::
        c = \frac{\text{max\_norm}}{\lVert g \rVert_2 + 10^{-6}}, \quad g \leftarrow c \, g \text{ if } c < 1

    c is computed in the gradients' dtype, as torch does. Like torch, a NaN norm makes c NaN and the
    gradients NaN (an infinite norm gives c = 0), so a divergence is not silently hidden.
    """
    _check_flat("grads", grads)
    if not (isinstance(max_norm, (int, float, np.number)) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"expected max_norm to be a finite number > 0, got {max_norm!r}")
    total = np.empty(1, dtype=np.float64)
    _kernels.sum_squares(grads, total)
    norm = math.sqrt(total[0])
    dt = grads.dtype.type
    coef = dt(max_norm) / (dt(norm) + dt(1e-6))
    if not coef >= 1:
        np.multiply(grads, coef, out=grads)
    return norm


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "rmsprop": RMSprop, "adam": Adam, "adamw": AdamW}


def make_optimizer(name: str, params: np.ndarray, grads: np.ndarray, lr: float, **kw) -> Optimizer:
    """Build an optimizer by name: ``"sgd"``, ``"rmsprop"``, ``"adam"`` or ``"adamw"`` (any case).

    Extra keyword arguments go to the optimizer's constructor.
    """
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    return cls(params, grads, lr=lr, **kw)
