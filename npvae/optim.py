"""Optimizers that update one flat parameter buffer in place, step for step like ``torch.optim`` or Keras.

A model keeps all its parameters in one contiguous 1-D array ``params`` and all gradients in a second
array ``grads`` of the same size and dtype; per-layer arrays are views into them. An optimizer holds
those two buffers, and ``step()`` runs one fused kernel (:mod:`npvae._kernels`) over them: no
allocation per step under the Numba backend. The scalars of a step (bias corrections, ``-lr``) are
computed once in Python, in the same order as ``torch.optim``'s single-tensor code, and cast to the
parameters' dtype before the kernel sees them, so float32 training stays float32.

``state_dict()`` returns plain arrays and numbers (hyperparameters, ``step``, state buffers), ready
for :func:`npvae.checkpoint.save_checkpoint`; ``load_state_dict`` checks keys and shapes first.

:data:`OPTIMIZERS` has one entry per optimizer: its name, help, whose convention it follows, and its
hyperparameters as an :class:`OptimizerOptions` dataclass (defaults, help, bounds), which the trainer's
settings and the command line read. Two conventions, named as such, because the same name means
different updates: ``rmsprop``/``adam``/``adamw``/``sgd`` are PyTorch's (``torch.optim``'s defaults and
formulas), ``keras-rmsprop``/``keras-adam`` are Keras 3's (what ``compile(optimizer='rmsprop')`` and
``'adam'`` build: other defaults, epsilon elsewhere, decoupled weight decay). A ``convention`` switch
on one entry would make every default depend on another setting, and the state buffers differ; one
entry per convention keeps each entry's defaults its framework's own.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from . import _kernels
from .registry import Registry, option

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
        Momentum factor in [0, 1). Nonzero allocates ``momentum_buffer``.
    dampening : float, default 0
        Dampening for momentum, in [0, 1].
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
        momentum = _number("momentum", momentum, high=1.0, high_open=True)
        dampening = _number("dampening", dampening, high=1.0)
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
        Smoothing constant of the squared-gradient average, in [0, 1).
    eps : float, default 1e-8
        Added to the root mean square.
    weight_decay : float, default 0
        L2 penalty, added to the gradient.
    momentum : float, default 0
        Momentum factor in [0, 1). Positive allocates ``momentum_buffer``.
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
        alpha = _number("alpha", alpha, high=1.0, high_open=True)
        eps = _number("eps", eps)
        weight_decay = _number("weight_decay", weight_decay)
        momentum = _number("momentum", momentum, high=1.0, high_open=True)
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
    # the state buffers: first moment, second moment, running maximum of the second (amsgrad)
    _moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    decoupled_weight_decay = False

    def __init__(self, params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False):
        super().__init__(params, grads, lr)
        self.amsgrad = bool(amsgrad)
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"expected betas to be a pair (beta1, beta2), got {betas!r}") from None
        self._configure(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        first, second, peak = self._moments
        self._state[first] = np.zeros_like(params)
        self._state[second] = np.zeros_like(params)
        if self.amsgrad:
            self._state[peak] = np.zeros_like(params)

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


class KerasRMSprop(Optimizer):
    r"""RMSprop as Keras 3 computes it (``keras.optimizers.RMSprop``, what ``compile(optimizer='rmsprop')`` builds).

    Parameters
    ----------
    params, grads : ndarray, shape (N,)
        Flat parameter and gradient buffers (see :class:`Optimizer`).
    lr : float, default 1e-3
        Learning rate.
    rho : float, default 0.9
        Decay of the squared-gradient average, in [0, 1) (torch calls it alpha, default 0.99).
    epsilon : float, default 1e-7
        Added to the squared-gradient average *inside* the square root (torch adds its eps outside).
    weight_decay : float, default 0
        Decoupled decay, as every Keras optimizer applies it: the parameters shrink before the step.
    momentum : float, default 0
        Momentum factor in [0, 1). Positive allocates ``momentum_buffer``, which accumulates lr-scaled steps.
    centered : bool, default False
        Subtract the squared mean gradient in the denominator (allocates ``average_gradient``).

    Notes
    -----
    Following ``keras/src/optimizers/rmsprop.py`` and its torch-backend twin
    ``keras/src/backend/torch/optimizers/torch_rmsprop.py`` (Keras 3.15):

    .. math::
        p \leftarrow (1 - \mathrm{lr}\,\lambda)\, p, \quad
        v \leftarrow \rho v + (1 - \rho) g^2, \quad
        a \leftarrow \rho a + (1 - \rho) g

        d = \sqrt{v + \epsilon - a^2 \text{ (centered) or } v + \epsilon}, \quad
        \Delta = \mathrm{lr}\, g / d

        m \leftarrow \mu m + \Delta, \quad p \leftarrow p - m
        \quad (\mu > 0; \text{ else } p \leftarrow p - \Delta)

    Beside the defaults (rho 0.9 against torch's alpha 0.99: a first step of lr / sqrt(1 - rho), 3.2 lr
    against 10 lr, on every weight), the rule differs in epsilon's place: where the squared average is
    tiny, torch divides by sqrt(v) + 1e-8 and Keras by sqrt(v + 1e-7) >= 3.2e-4, so Keras' step is at
    most lr |g| / 3.2e-4 where torch's is not bounded. State buffers: ``velocity`` and
    ``average_gradient`` (Keras' names) and ``momentum_buffer`` (Keras' "momentum", renamed: here that
    is the factor). The update runs as in-place NumPy over the preallocated scratch, in both backends
    and with no allocation per step: it is memory-bound, a few passes over N beside a model's step.
    """

    _hyper = ("rho", "epsilon", "weight_decay", "momentum")
    _flags = ("centered",)

    def __init__(self, params, grads, lr=1e-3, rho=0.9, epsilon=1e-7, weight_decay=0.0, momentum=0.0,
                 centered=False):
        super().__init__(params, grads, lr)
        self.centered = bool(centered)
        self._configure(rho=rho, epsilon=epsilon, weight_decay=weight_decay, momentum=momentum)
        self._state["velocity"] = np.zeros_like(params)
        if self.centered:
            self._state["average_gradient"] = np.zeros_like(params)
        if self.momentum > 0:
            self._state["momentum_buffer"] = np.zeros_like(params)

    def _configure(self, rho, epsilon, weight_decay, momentum):
        rho = _number("rho", rho, high=1.0, high_open=True)
        epsilon = _number("epsilon", epsilon)
        weight_decay = _number("weight_decay", weight_decay)
        momentum = _number("momentum", momentum, high=1.0, high_open=True)
        self.rho, self.epsilon, self.weight_decay, self.momentum = rho, epsilon, weight_decay, momentum

    def _update(self, t):
        dt = self.params.dtype.type
        p, g, v = self.params, self.grads, self._state["velocity"]
        w, inc = self._work
        if self.weight_decay != 0:
            np.multiply(p, dt(1 - self.weight_decay * self.lr), out=p)
        rho, keep = dt(self.rho), dt(1 - self.rho)
        np.multiply(v, rho, out=v)
        np.multiply(g, g, out=w)
        v += np.multiply(w, keep, out=w)
        np.add(v, dt(self.epsilon), out=w)
        if self.centered:
            a = self._state["average_gradient"]
            np.multiply(a, rho, out=a)
            a += np.multiply(g, keep, out=inc)
            w -= np.multiply(a, a, out=inc)
        np.sqrt(w, out=w)
        np.divide(np.multiply(g, dt(self.lr), out=inc), w, out=inc)
        if self.momentum > 0:
            m = self._state["momentum_buffer"]
            np.multiply(m, dt(self.momentum), out=m)
            m += inc
            p -= m
        else:
            p -= inc


class KerasAdam(Adam):
    r"""Adam as Keras 3 computes it (``keras.optimizers.Adam``, what ``compile(optimizer='adam')`` builds).

    Parameters as :class:`Adam`, except: ``eps`` (default 1e-7) is added to the root of the *uncorrected*
    second moment, the bias corrections fold into the step size, and ``weight_decay`` is decoupled
    (Keras' weight decay: the parameters shrink by ``1 - lr * weight_decay`` before the step).

    Notes
    -----
    Following ``keras/src/optimizers/adam.py`` and ``keras/src/backend/torch/optimizers/torch_adam.py``
    (Keras 3.15), with g = grad and step t:

    .. math::
        m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad v \leftarrow \beta_2 v + (1 - \beta_2) g^2,
        \quad \hat v \leftarrow \max(\hat v, v) \text{ (amsgrad; used for } v)

        \alpha_t = \mathrm{lr} \, \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}, \quad
        p \leftarrow p - \alpha_t \, \frac{m}{\sqrt{v} + \epsilon}

    That is torch's update with epsilon divided by sqrt(1 - beta2^t): early on (t = 1, beta2 = 0.999)
    Keras' 1e-7 acts as torch's 3.2e-6. It runs on the Adam kernel with the step size alpha_t and a
    bias correction of 1. State buffers carry Keras' names: ``momentum``, ``velocity``, ``velocity_hat``.
    """

    _flags = ("amsgrad",)
    _moments = ("momentum", "velocity", "velocity_hat")

    def __init__(self, params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-7, weight_decay=0.0, amsgrad=False):
        super().__init__(params, grads, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)

    def _update(self, t):
        dt = self.params.dtype.type
        alpha = self.lr * math.sqrt(1 - self.beta2**t) / (1 - self.beta1**t)
        w1 = dt(1 - self.beta1)
        _kernels.adam_step(
            self.params, self.grads, self._state["momentum"], self._state["velocity"],
            self._buffer("velocity_hat"), w1, dt(1) - w1, bool(abs(w1) < 0.5), dt(self.beta2),
            dt(1 - self.beta2), dt(-alpha), dt(1), dt(self.eps), dt(0), dt(1 - self.lr * self.weight_decay),
            self.amsgrad, self._work,
        )


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


# ----------------------------------------------------------------------------- the registry


def _hyper(default, help: str, low: float = 0.0, high: float = math.inf, high_open: bool = False):
    """An optimizer option: a number in [low, high] (or [low, high)), or a switch when ``default`` is a bool."""
    return option(default, help, bounds=(low, high, high_open))


@dataclass(frozen=True)
class OptimizerOptions:
    """Base of the hyperparameter dataclasses: every field is checked against its bounds on construction.

    The field names are one vocabulary across conventions (``rho`` is torch's alpha and Keras' rho,
    ``epsilon`` torch's eps and Keras' epsilon, ``beta1``/``beta2`` torch's betas), so a setting means
    the same thing whichever optimizer reads it; :class:`npvae.train.TrainConfig` has one field for each.
    """

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, bool):
                if not isinstance(value, (bool, np.bool_)):
                    raise TypeError(f"expected {f.name} to be True or False, got {value!r}")
            elif isinstance(value, (bool, np.bool_)):
                raise TypeError(f"expected {f.name} to be a number, got {value!r}")
            else:
                _number(f.name, value, *f.metadata["bounds"])


_UNIT = dict(high=1.0, high_open=True)  # a decay rate or momentum factor: [0, 1)


@dataclass(frozen=True)
class SGDOptions(OptimizerOptions):
    momentum: float = _hyper(0.0, "momentum factor", **_UNIT)
    dampening: float = _hyper(0.0, "dampening of the momentum average", high=1.0)
    nesterov: bool = _hyper(False, "Nesterov momentum (needs momentum > 0 and dampening 0)")
    weight_decay: float = _hyper(0.0, "L2 penalty added to the gradient")

    def __post_init__(self):
        super().__post_init__()
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening = 0, "
                             f"got momentum={self.momentum}, dampening={self.dampening}")


@dataclass(frozen=True)
class TorchRMSpropOptions(OptimizerOptions):
    rho: float = _hyper(0.99, "decay of the squared-gradient average (torch's alpha)", **_UNIT)
    epsilon: float = _hyper(1e-8, "added to the root mean square (torch's eps, outside the root)")
    momentum: float = _hyper(0.0, "momentum factor", **_UNIT)
    centered: bool = _hyper(False, "divide by the gradient's estimated standard deviation, not its RMS")
    weight_decay: float = _hyper(0.0, "L2 penalty added to the gradient")


@dataclass(frozen=True)
class TorchAdamOptions(OptimizerOptions):
    beta1: float = _hyper(0.9, "decay of the first-moment average", **_UNIT)
    beta2: float = _hyper(0.999, "decay of the second-moment average", **_UNIT)
    epsilon: float = _hyper(1e-8, "added to the bias-corrected root of the second moment (torch's eps)")
    amsgrad: bool = _hyper(False, "divide by the running maximum of the second moment")
    weight_decay: float = _hyper(0.0, "L2 penalty added to the gradient")


@dataclass(frozen=True)
class TorchAdamWOptions(TorchAdamOptions):
    weight_decay: float = _hyper(1e-2, "decoupled decay: parameters shrink by 1 - lr * weight_decay each step")


@dataclass(frozen=True)
class KerasRMSpropOptions(OptimizerOptions):
    rho: float = _hyper(0.9, "decay of the squared-gradient average", **_UNIT)
    epsilon: float = _hyper(1e-7, "added to the squared-gradient average inside the root")
    momentum: float = _hyper(0.0, "momentum factor (the buffer holds lr-scaled steps)", **_UNIT)
    centered: bool = _hyper(False, "subtract the squared mean gradient inside the root")
    weight_decay: float = _hyper(0.0, "decoupled decay: parameters shrink by 1 - lr * weight_decay each step")


@dataclass(frozen=True)
class KerasAdamOptions(OptimizerOptions):
    beta1: float = _hyper(0.9, "decay of the first-moment average (Keras' beta_1)", **_UNIT)
    beta2: float = _hyper(0.999, "decay of the second-moment average (Keras' beta_2)", **_UNIT)
    epsilon: float = _hyper(1e-7, "added to the root of the uncorrected second moment")
    amsgrad: bool = _hyper(False, "divide by the running maximum of the second moment")
    weight_decay: float = _hyper(0.0, "decoupled decay: parameters shrink by 1 - lr * weight_decay each step")


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer: its name, what it is, whose convention it follows and its hyperparameters.

    Attributes
    ----------
    name : str
        What ``--optimizer`` and recipes call it.
    help : str
        One line for listings.
    convention : str
        Whose update rule and defaults it reproduces: ``"pytorch"`` or ``"keras"``.
    cls : type
        The :class:`Optimizer` it builds.
    options : type
        Its :class:`OptimizerOptions` dataclass (fields, defaults, help, bounds).
    kwargs : callable
        options -> ``cls``'s constructor keywords (the classes keep their framework's argument names).
    """

    name: str
    help: str
    convention: str
    cls: type
    options: type
    kwargs: Callable[[Any], dict]

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options))

    def options_from(self, settings: Mapping[str, Any]) -> OptimizerOptions:
        """This optimizer's options with ``settings`` (option name -> value) applied over its defaults.

        Raises
        ------
        ValueError, TypeError
            One line naming this optimizer: a setting it does not take, or a value out of range.
        """
        foreign = sorted(set(settings) - set(self.option_names))
        if foreign:
            raise ValueError(f"optimizer {self.name} takes no {', '.join(foreign)}; "
                             f"its options are {', '.join(self.option_names)}")
        try:
            return self.options(**settings)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"optimizer {self.name}: {exc}") from None

    def build(self, params: np.ndarray, grads: np.ndarray, lr: float,
              options: OptimizerOptions | None = None) -> Optimizer:
        """The optimizer over the flat buffers, with ``options`` (default: this entry's defaults)."""
        options = self.options() if options is None else options
        if not isinstance(options, self.options):
            raise TypeError(f"optimizer {self.name} needs {self.options.__name__}, got {type(options).__name__}")
        return self.cls(params, grads, lr=lr, **self.kwargs(options))


OPTIMIZERS: Registry[OptimizerEntry] = Registry("optimizer")


def _adam_kwargs(o) -> dict:
    return dict(betas=(o.beta1, o.beta2), eps=o.epsilon, weight_decay=o.weight_decay, amsgrad=o.amsgrad)


OPTIMIZERS.register(OptimizerEntry(
    "sgd", "stochastic gradient descent with momentum, as torch.optim.SGD", "pytorch", SGD, SGDOptions,
    dataclasses.asdict))
OPTIMIZERS.register(OptimizerEntry(
    "rmsprop", "RMSprop as torch.optim.RMSprop (alpha 0.99, eps 1e-8 outside the root)", "pytorch", RMSprop,
    TorchRMSpropOptions, lambda o: dict(alpha=o.rho, eps=o.epsilon, weight_decay=o.weight_decay,
                                        momentum=o.momentum, centered=o.centered)))
OPTIMIZERS.register(OptimizerEntry(
    "adam", "Adam as torch.optim.Adam (eps 1e-8 after bias correction, L2 weight decay)", "pytorch", Adam,
    TorchAdamOptions, _adam_kwargs))
OPTIMIZERS.register(OptimizerEntry(
    "adamw", "AdamW as torch.optim.AdamW (decoupled weight decay)", "pytorch", AdamW, TorchAdamWOptions,
    _adam_kwargs))
OPTIMIZERS.register(OptimizerEntry(
    "keras-rmsprop", "RMSprop as Keras 3's 'rmsprop' (rho 0.9, epsilon 1e-7 inside the root)", "keras",
    KerasRMSprop, KerasRMSpropOptions, dataclasses.asdict))
OPTIMIZERS.register(OptimizerEntry(
    "keras-adam", "Adam as Keras 3's 'adam' (epsilon 1e-7 before bias correction, decoupled weight decay)",
    "keras", KerasAdam, KerasAdamOptions, _adam_kwargs))


def hyperparameter_names() -> tuple[str, ...]:
    """Every option name some registered optimizer takes, in first-seen order (TrainConfig has one field each)."""
    return tuple(dict.fromkeys(name for entry in OPTIMIZERS.values() for name in entry.option_names))


def make_optimizer(name: str, params: np.ndarray, grads: np.ndarray, lr: float, **kw) -> Optimizer:
    """Build a registered optimizer by name (any case), passing ``kw`` to its class's constructor
    (the class's own argument names: ``betas``, ``eps``, ``alpha`` for torch's)."""
    return OPTIMIZERS[str(name).lower()].cls(params, grads, lr=lr, **kw)
