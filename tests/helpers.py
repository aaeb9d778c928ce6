"""Shared test utilities for the op and kernel tests (and ``scripts/op_error_table.py``).

- :func:`rel_error`: the CS231n relative error over a whole array.
- :func:`numeric_gradient`: central finite differences of ``sum(dout * f(x))``.
- Float64 PyTorch references written from the math, with exact-coefficient Taylor series where a
  closed form loses digits (the coefficients are Fractions built from Bernoulli numbers).
- :data:`OP_SPECS`: one entry per op (and per reduction / activation) saying how to draw its inputs,
  run ours, and run the reference. The tests and the error-table script share it, so a new op is
  added once.
- Sources of inputs: :class:`HypothesisSource` (tests) and :class:`RandomSource` (the script).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from npvae import ops
from npvae.backend import numba_available

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """A script of scripts/ (``"bench"`` -> scripts/bench.py) imported as a module, for its tests."""
    spec = importlib.util.spec_from_file_location(f"npvae_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

try:
    import torch
except ImportError:  # test_ops.py skips itself; test_kernels.py needs no torch
    torch = None
else:
    # On a 2-core machine torch's intra-op threads and OpenBLAS's fight: a 64x64 reference took
    # 5-10 ms with 2 torch threads and under 1 ms with one.
    torch.set_num_threads(1)

BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("numba", id="numba", marks=pytest.mark.skipif(not numba_available(), reason="numba not installed")),
]
REDUCTIONS = ops.REDUCTIONS
ACTIVATIONS = ops.ACTIVATIONS


# ----------------------------------------------------------------------------- error metrics


def rel_error(a, b, floor: float = 0.0) -> float:
    """CS231n relative error over the whole array: ``max|a - b| / max(|a| + |b|)``, in float64.

    ``floor``, when given, is a lower bound on the denominator: the magnitude of the terms of a
    result that cancels, or a gradient's natural scale (see :class:`OpSpec`).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(1e-300, floor, float(np.max(np.abs(a) + np.abs(b)))))


def parameter_differences(flat: np.ndarray, indices, loss: Callable[[], float], h: float = 1e-6) -> np.ndarray:
    """Central differences ``(loss(p + h e_i) - loss(p - h e_i)) / 2h`` of a model's flat parameter
    buffer ``flat`` at each index in ``indices``; every entry is restored afterwards."""
    numeric = []
    for i in indices:
        old = flat[i]
        flat[i] = old + h
        up = loss()
        flat[i] = old - h
        down = loss()
        flat[i] = old
        numeric.append((up - down) / (2 * h))
    return np.array(numeric)


def numeric_gradient(f: Callable, inputs: dict, name: str, dout, h: float = 1e-6, truncation: bool = False):
    """Central differences of ``sum(dout * f(inputs))`` with respect to ``inputs[name]``, every coordinate.

    ``f`` returns an array or a scalar. The difference ``f(x + h) - f(x - h)`` is taken before the
    projection onto ``dout``, so entries that do not depend on the perturbed coordinate cancel exactly.
    The step used is the representable one, ``(x + h) - (x - h)``.

    Returns
    -------
    grad : array of inputs[name]'s shape
    noise : float
        What the difference quotient cannot resolve: its rounding error, ``eps * sum|dout * f(x +- h)| / h``
        at worst over the coordinates, plus, with ``truncation=True`` (a second pass), its truncation
        error, estimated (Richardson) from the same quotient with step 2h. Where the true gradient is
        exactly 0 (KL at the prior) these are all there is.
    """

    def quotient(step):
        nonlocal rounding
        grad = np.zeros(x.shape, dtype=np.float64)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + step
            plus = np.array(f(inputs), dtype=np.float64)
            up = x[idx]
            x[idx] = old - step
            minus = np.array(f(inputs), dtype=np.float64)
            down = x[idx]
            x[idx] = old
            grad[idx] = np.sum(dout * (plus - minus)) / (up - down)
            size = np.sum(np.abs(dout * plus)) + np.sum(np.abs(dout * minus))
            rounding = max(rounding, float(np.finfo(np.float64).eps * size / (up - down)))
        return grad

    x = inputs[name]
    dout = np.asarray(dout, dtype=np.float64)
    rounding = 0.0
    grad = quotient(h)
    if truncation:
        rounding += float(np.max(np.abs(quotient(2 * h) - grad), initial=0.0)) / 3  # error(2h) ~ 4 error(h)
    return grad, 2 * rounding


# ----------------------------------------------------------------------------- exact series coefficients


def bernoulli_numbers(n: int) -> list[Fraction]:
    """B_0 .. B_n exactly (B_1 = -1/2), from sum_{k<=m} C(m+1, k) B_k = 0."""
    b = [Fraction(1)]
    for m in range(1, n + 1):
        b.append(-sum(math.comb(m + 1, k) * b[k] for k in range(m)) / (m + 1))
    return b


_TERMS = 10
_B = bernoulli_numbers(2 * _TERMS + 2)
# 1/l - 1/sinh(l) = sum_{n>=1} c_n l^(2n-1),  c_n = 2 (2^(2n-1) - 1) B_2n / (2n)!
CB_GRAD_COEFFS = [2 * (2 ** (2 * n - 1) - 1) * _B[2 * n] / math.factorial(2 * n) for n in range(1, _TERMS + 1)]
# log(l / tanh(l/2)) = log 2 + sum_{n>=1} c_n / (2n) l^(2n)   (the integral of the above)
CB_LOG_NORM_COEFFS = [c / (2 * n) for n, c in enumerate(CB_GRAD_COEFFS, start=1)]
# E[x] = 1/(1 - e^-l) - 1/l = 1/2 + sum_{k>=1} B_2k / (2k)! l^(2k-1)
CB_MEAN_COEFFS = [_B[2 * k] / math.factorial(2 * k) for k in range(1, _TERMS + 1)]
# e^d - 1 - d = sum_{k>=2} d^k / k!
EXP_EXCESS_COEFFS = [Fraction(1, math.factorial(k)) for k in range(2, 2 * _TERMS + 2)]


def _horner(x, coeffs):
    acc = 0.0
    for c in reversed(coeffs):
        acc = acc * x + float(c)
    return acc


# ----------------------------------------------------------------------------- float64 torch references
#
# Written from the math, not from npvae's formulas. Where the textbook form cancels, the reference
# switches to a series with exact coefficients (10 terms: truncation below 1e-30 in its region), so
# the reference is accurate to a few ulps everywhere and autograd through it is too.


def torch_softplus(x):
    # torch.nn.functional.softplus linearises above threshold=20 (an error of ~2e-9 at x=20), and
    # F.binary_cross_entropy_with_logits computes log(1 + e^-|x|) without log1p (0 instead of 4e-18
    # at x=-40); logaddexp uses log1p and is exact to the ulp.
    return torch.logaddexp(x, torch.zeros_like(x))


def torch_reduce(rows, reduction: str, per_row: int):
    """Reduce per-example values (B,) the way npvae documents its reductions."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / rows.shape[0]
    if reduction == "mean":
        return rows.sum() / (rows.shape[0] * per_row)
    raise ValueError(reduction)


def torch_exp_excess(d):
    """e^d - 1 - d. The closed form (even with expm1) cancels to relative error ~2 eps / |d| near 0,
    and torch.exp(d) - 1 - d (what torch.distributions.kl_divergence does) loses everything below
    |d| ~ 1e-8; so the series below |d| < 0.1."""
    small = d.abs() < 0.1
    return torch.where(small, _horner(d, EXP_EXCESS_COEFFS) * d * d, torch.expm1(d) - d)


def torch_cb_log_norm(l):
    """log(l / tanh(l/2)). torch.distributions.ContinuousBernoulli computes this from probabilities,
    where log(1 - p) loses digits at large logits, and its autograd of the closed form in logits
    cancels near 0 (1/l - 1/sinh l from two terms of size 1/l); so the closed form in logits for
    |l| >= 0.1 (at most a 600x cancellation: ~1e-13) and the exact series below."""
    a = l.abs()
    small = a < 0.1
    safe = torch.where(small, torch.ones_like(a), a)
    closed = torch.log(safe / torch.tanh(safe / 2))
    series = math.log(2.0) + _horner(l * l, CB_LOG_NORM_COEFFS) * l * l
    return torch.where(small, series, closed)


def torch_cb_mean(l):
    """Continuous-Bernoulli mean 1/(1 - e^-l) - 1/l; exact series below |l| < 0.1 (cancellation)."""
    small = l.abs() < 0.1
    safe = torch.where(small, torch.ones_like(l), l)
    closed = 1 / -torch.expm1(-safe) - 1 / safe
    series = 0.5 + _horner(l * l, CB_MEAN_COEFFS) * l
    return torch.where(small, series, closed)


def torch_bce_rows(logits, target):
    return (torch_softplus(logits) - target * logits).sum(1)


def torch_kl_normal_rows(mu, logvar):
    return 0.5 * (mu * mu + torch_exp_excess(logvar)).sum(1)


def torch_kl_gaussians_rows(mu, logvar, mu_p, logvar_p):
    # KL = 1/2 [log s_p^2/s^2 + (s^2 + (mu - mu_p)^2) / s_p^2 - 1], with d = logvar - logvar_p
    return 0.5 * (torch_exp_excess(logvar - logvar_p) + (mu - mu_p) ** 2 * torch.exp(-logvar_p)).sum(1)


def torch_activation(a, name: str, alpha: float):
    if name == "identity":
        return a
    if name == "relu":
        return torch.relu(a)
    if name == "leaky_relu":
        return torch.nn.functional.leaky_relu(a, alpha)
    if name == "sigmoid":
        return torch.sigmoid(a)
    if name == "tanh":
        return torch.tanh(a)
    if name == "softplus":
        return torch_softplus(a)
    raise ValueError(name)


# ----------------------------------------------------------------------------- input sources


def random_array(rng: np.random.Generator, shape, lo: float, hi: float) -> np.ndarray:
    """Uniform on [lo, hi] with ~10% endpoints, ~20% log-uniform small magnitudes in [1e-12, 1], ~3% zeros."""
    x = rng.uniform(lo, hi, shape)
    kind = rng.random(shape)
    ends = np.where(rng.random(shape) < 0.5, lo, hi)
    small = np.clip(rng.choice([-1.0, 1.0], shape) * 10.0 ** rng.uniform(-12, 0, shape), lo, hi)
    x = np.where(kind < 0.10, ends, x)
    x = np.where((kind >= 0.10) & (kind < 0.30), small, x)
    if lo <= 0 <= hi:
        x = np.where((kind >= 0.30) & (kind < 0.33), 0.0, x)
    return x


class RandomSource:
    """Inputs from a NumPy generator (for the error-table script): a quarter of the arrays are
    palettes of 1-3 values (endpoints, tiny magnitudes, zeros included), so whole arrays sit in one
    regime (all saturated, all near 0) as Hypothesis's palettes do; the rest are :func:`random_array`."""

    def __init__(self, rng: np.random.Generator, max_dim: int = 64):
        self.rng = rng
        self.max_dim = max_dim

    def dim(self) -> int:
        return int(self.rng.integers(1, self.max_dim + 1))

    def uniform(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def array(self, shape, lo: float, hi: float) -> np.ndarray:
        if self.rng.random() < 0.25:
            palette = random_array(self.rng, (int(self.rng.integers(1, 4)),), lo, hi)
            return palette[self.rng.integers(len(palette), size=shape)]
        return random_array(self.rng, shape, lo, hi)


class HypothesisSource:
    """Inputs drawn by Hypothesis: each array is either a palette array (up to 8 Hypothesis floats,
    with its edge cases: bounds, zeros, tiny and huge magnitudes, scattered by a drawn seed; it
    shrinks to all zeros) or a seeded :func:`random_array` (dense variety). Drawing 64 x 64 arrays
    element by element through hypothesis.extra.numpy cost ~30 ms an example; this costs ~1 ms.

    No subnormals: they carry fewer than 53 bits, so two correct evaluations that round in a different
    order differ in the leading digits. The stability tests feed them in for finiteness."""

    def __init__(self, data, max_dim: int = 64):
        self.data = data
        self.max_dim = max_dim

    def dim(self) -> int:
        from hypothesis import strategies as st

        return self.data.draw(st.integers(1, self.max_dim))

    def uniform(self, lo: float, hi: float) -> float:
        from hypothesis import strategies as st

        return self.data.draw(st.floats(lo, hi, allow_subnormal=False))

    def array(self, shape, lo: float, hi: float) -> np.ndarray:
        from hypothesis import strategies as st

        seeds = st.integers(0, 2**32 - 1)
        values = st.floats(lo, hi, allow_subnormal=False)
        palette = st.tuples(st.lists(values, min_size=1, max_size=8), seeds).map(
            lambda p: np.array(p[0])[np.random.default_rng(p[1]).integers(len(p[0]), size=shape)]
        )
        seeded = seeds.map(lambda seed: random_array(np.random.default_rng(seed), shape, lo, hi))
        return self.data.draw(st.one_of(palette, seeded))


def draw_dout(src, out):
    """A random upstream gradient shaped like ``out`` (a scalar for scalar losses).

    Entries below 1e-200 are flushed to 0: a subnormal upstream gradient (Hypothesis draws 2e-313),
    divided by B for "batchmean", keeps only a few bits, and two correct gradients then differ in
    the 10th digit.
    """
    if np.ndim(out) == 0:
        dout = src.uniform(-2.0, 2.0)
        return 0.0 if abs(dout) < 1e-200 else dout
    dout = src.array(np.shape(out), -2.0, 2.0)
    return np.where(np.abs(dout) < 1e-200, 0.0, dout)


# ----------------------------------------------------------------------------- value ranges

# "torch": the float64 comparison, extremes included. "fd": finite differences, where the rounding
# error of the difference quotient grows with |f| / h, so magnitudes stay moderate.
RANGES = {
    "torch": {"logits": 100.0, "logvar": 30.0, "value": 10.0, "weight": 1.0, "pred": 100.0, "eps": 5.0},
    "fd": {"logits": 20.0, "logvar": 5.0, "value": 10.0, "weight": 1.0, "pred": 10.0, "eps": 3.0},
}


def away_from_zero(a: np.ndarray, margin: float) -> np.ndarray:
    """Move entries within ``margin`` of 0 to +-margin (keeping the sign; 0 goes to +margin)."""
    if margin <= 0:
        return a
    return np.where(np.abs(a) < margin, np.copysign(margin, a), a)


def bias_off_kinks(x, w, b, margin: float) -> np.ndarray:
    """Shift each bias b[j] (as little as needed) so every pre-activation x W^T + b is >= margin from 0.

    Per column the forbidden biases are windows of half-width margin around -c[i, j] (c = x W^T);
    the nearest admissible candidate among b[j] and the window edges (+-2 margin) is taken; the
    rightmost edge is always admissible.
    """
    if margin <= 0:
        return b
    c = x @ w.T  # (B, O)
    b = b.copy()
    for j in range(b.shape[0]):
        candidates = np.concatenate([[b[j]], -c[:, j] - 2 * margin, -c[:, j] + 2 * margin])  # (K,)
        ok = np.all(np.abs(c[None, :, j] + candidates[:, None]) >= margin, axis=1)
        b[j] = candidates[ok][np.argmin(np.abs(candidates[ok] - b[j]))]
    return b


def rows_off_zero(z: np.ndarray, margin: float) -> np.ndarray:
    """Rows with norm below ``margin`` get ``margin`` added to their first entry (l2 norm's kink at 0)."""
    if margin <= 0:
        return z
    z = z.copy()
    small = np.sqrt(np.sum(z * z, axis=1)) < margin
    z[small, 0] += margin * 2
    return z


# ----------------------------------------------------------------------------- the op table


@dataclass(frozen=True)
class OpSpec:
    """One op under test.

    build(src, ranges, margin) -> dict of float64 inputs (arrays, plus plain floats for parameters);
    ``margin`` keeps ReLU/LeakyReLU pre-activations and l2-norm rows that far from their kinks.
    forward(inputs) -> (out, cache); backward(dout, cache) -> {input name: gradient} for ``wrt``.
    reference(torch inputs) -> torch tensor, float64, differentiable in ``wrt``.
    scale(inputs) -> the magnitude the float32 forward error is judged against (default max|out|):
    for ops whose result cancels (x W^T, mu + std eps, BCE - log C) it is the magnitude of the terms.
    grad_floor(inputs, dout) -> {input: magnitude}: a lower bound on the denominator of a gradient's
    relative error. Set for sigmoid and tanh, whose derivatives are read off the output (y (1 - y),
    1 - y^2): in saturation (tanh(9) = 1 - 3e-8) an ulp of y is a 1e-9 relative change of the
    derivative, so the derivative is exact to ~ulp(1) |dy| absolutely, not relatively; a different but
    correct tanh (torch's) differs by that much. The floor is the gradient's natural scale: |dout|,
    carried through |W| and |x| for dense layers.
    cancels: the float64 forward too is judged against ``scale``, not the result: set only for the
    continuous-Bernoulli NLL, a difference of two sums of ~log 2 per element (BCE - log C) that
    cancel to ~l/2 - x l as l -> 0, so a correct result can be 1e-15 with an ulp-of-log-2 error.
    """

    name: str
    build: Callable
    forward: Callable
    backward: Callable | None
    reference: Callable
    wrt: tuple = ()
    scale: Callable | None = None
    cancels: bool = False
    grad_floor: Callable | None = None


def _same_shape_inputs(**kinds):
    """A builder of (B, D) arrays, one per keyword; a kind is a key of RANGES (symmetric bounds) or "unit"."""

    def build(src, r, margin):
        B, D = src.dim(), src.dim()
        return {name: src.array((B, D), *((0.0, 1.0) if k == "unit" else (-r[k], r[k]))) for name, k in kinds.items()}

    return build


def _specs() -> list[OpSpec]:
    specs = []

    def affine_build(src, r, margin):
        B, I, O = src.dim(), src.dim(), src.dim()
        v, w = r["value"], r["weight"]
        return {"x": src.array((B, I), -v, v), "w": src.array((O, I), -w, w), "b": src.array((O,), -v, v)}

    def bce_scale(i):
        return float(np.max(np.sum(np.abs(i["logits"]) * (1 + np.abs(i["target"])), axis=1)))

    def affine_scale(i):
        return float(np.max(np.abs(i["x"]) @ np.abs(i["w"]).T + np.abs(i["b"])))

    specs.append(
        OpSpec(
            "affine",
            affine_build,
            lambda i: ops.affine_forward(i["x"], i["w"], i["b"]),
            lambda d, c: dict(zip("xwb", ops.affine_backward(d, c))),
            lambda t: t["x"] @ t["w"].T + t["b"],
            ("x", "w", "b"),
            affine_scale,
        )
    )

    def act_floor(i, dout):
        return {"a": float(np.max(np.abs(dout), initial=0.0))}

    def dense_floor(i, dout):
        d = np.abs(dout)  # (B, O)
        return {
            "x": float(np.max(d @ np.abs(i["w"]), initial=0.0)),
            "w": float(np.max(d.T @ np.abs(i["x"]), initial=0.0)),
            "b": float(np.max(d.sum(0), initial=0.0)),
        }

    for act in ACTIVATIONS:
        kinked = act in ("relu", "leaky_relu")
        saturates = act in ("sigmoid", "tanh")

        def act_build(src, r, margin, kinked=kinked):
            a = src.array((src.dim(), src.dim()), -r["logits"], r["logits"])
            return {"a": away_from_zero(a, margin) if kinked else a, "alpha": src.uniform(0.0, 1.0)}

        def dense_build(src, r, margin, kinked=kinked):
            inputs = affine_build(src, r, margin)
            if kinked:
                inputs["b"] = bias_off_kinks(inputs["x"], inputs["w"], inputs["b"], margin)
            inputs["alpha"] = src.uniform(0.0, 1.0)
            return inputs

        specs.append(
            OpSpec(
                f"activation[{act}]",
                act_build,
                lambda i, act=act: ops.activation_forward(i["a"], act, alpha=i["alpha"]),
                lambda d, c: {"a": ops.activation_backward(d, c)},
                lambda t, act=act: torch_activation(t["a"], act, t["alpha"]),
                ("a",),
                grad_floor=act_floor if saturates else None,
            )
        )
        specs.append(
            OpSpec(
                f"dense[{act}]",
                dense_build,
                lambda i, act=act: ops.dense_forward(i["x"], i["w"], i["b"], act, alpha=i["alpha"]),
                lambda d, c: dict(zip("xwb", ops.dense_backward(d, c))),
                lambda t, act=act: torch_activation(t["x"] @ t["w"].T + t["b"], act, t["alpha"]),
                ("x", "w", "b"),
                affine_scale,  # the float32 error of x W^T + b, through an activation with |f'| <= 1
                grad_floor=dense_floor if saturates else None,
            )
        )

    for red in REDUCTIONS:
        specs += [
            OpSpec(
                f"bce_with_logits[{red}]",
                _same_shape_inputs(logits="logits", target="unit"),
                lambda i, red=red: ops.bce_with_logits_forward(i["logits"], i["target"], red),
                lambda d, c: {"logits": ops.bce_with_logits_backward(d, c)},
                lambda t, red=red: torch_reduce(torch_bce_rows(t["logits"], t["target"]), red, t["logits"].shape[1]),
                ("logits",),
                # max(l, 0) - t l + log1p(exp(-|l|)) cancels: at l = 20, t = 1 the result is 2e-9 while the
                # terms are 20, so the forward's rounding is judged against the terms
                bce_scale,
            ),
            OpSpec(
                f"mse[{red}]",
                _same_shape_inputs(pred="pred", target="pred"),
                lambda i, red=red: ops.mse_forward(i["pred"], i["target"], red),
                lambda d, c: {"pred": ops.mse_backward(d, c)},
                lambda t, red=red: torch_reduce(((t["pred"] - t["target"]) ** 2).sum(1), red, t["pred"].shape[1]),
                ("pred",),
            ),
            OpSpec(
                f"gaussian_nll[{red}]",
                _same_shape_inputs(pred="pred", target="pred"),
                lambda i, red=red: ops.gaussian_nll_forward(i["pred"], i["target"], red),
                lambda d, c: {"pred": ops.gaussian_nll_backward(d, c)},
                lambda t, red=red: torch_reduce(
                    0.5 * ((t["pred"] - t["target"]) ** 2).sum(1) + 0.5 * t["pred"].shape[1] * math.log(2 * math.pi),
                    red,
                    t["pred"].shape[1],
                ),
                ("pred",),
            ),
            OpSpec(
                f"cb_log_norm[{red}]",
                _same_shape_inputs(logits="logits"),
                lambda i, red=red: ops.cb_log_norm_forward(i["logits"], red),
                lambda d, c: {"logits": ops.cb_log_norm_backward(d, c)},
                lambda t, red=red: torch_reduce(torch_cb_log_norm(t["logits"]).sum(1), red, t["logits"].shape[1]),
                ("logits",),
            ),
            OpSpec(
                f"continuous_bernoulli_nll[{red}]",
                _same_shape_inputs(logits="logits", target="unit"),
                lambda i, red=red: ops.continuous_bernoulli_nll_forward(i["logits"], i["target"], red),
                lambda d, c: {"logits": ops.continuous_bernoulli_nll_backward(d, c)},
                lambda t, red=red: torch_reduce(
                    torch_bce_rows(t["logits"], t["target"]) - torch_cb_log_norm(t["logits"]).sum(1),
                    red,
                    t["logits"].shape[1],
                ),
                ("logits",),
                # the NLL is BCE - log C and may cancel: judge against BCE + log C (both >= 0)
                lambda i, red=red: float(
                    np.max(
                        np.abs(
                            ops.bce_with_logits_forward(i["logits"], i["target"], red)[0]
                            + ops.cb_log_norm_forward(i["logits"], red)[0]
                        )
                    )
                ),
                cancels=True,
            ),
            OpSpec(
                f"kl_normal[{red}]",
                _same_shape_inputs(mu="value", logvar="logvar"),
                lambda i, red=red: ops.kl_normal_forward(i["mu"], i["logvar"], red),
                lambda d, c: dict(zip(("mu", "logvar"), ops.kl_normal_backward(d, c))),
                lambda t, red=red: torch_reduce(torch_kl_normal_rows(t["mu"], t["logvar"]), red, t["mu"].shape[1]),
                ("mu", "logvar"),
            ),
            OpSpec(
                f"kl_gaussians[{red}]",
                _same_shape_inputs(mu="value", logvar="logvar", mu_p="value", logvar_p="logvar"),
                lambda i, red=red: ops.kl_gaussians_forward(i["mu"], i["logvar"], i["mu_p"], i["logvar_p"], red),
                lambda d, c: dict(zip(("mu", "logvar", "mu_p", "logvar_p"), ops.kl_gaussians_backward(d, c))),
                lambda t, red=red: torch_reduce(
                    torch_kl_gaussians_rows(t["mu"], t["logvar"], t["mu_p"], t["logvar_p"]), red, t["mu"].shape[1]
                ),
                ("mu", "logvar", "mu_p", "logvar_p"),
            ),
        ]

        def l2_build(src, r, margin):
            z = src.array((src.dim(), src.dim()), -r["pred"], r["pred"])
            return {"z": rows_off_zero(z, margin)}

        specs.append(
            OpSpec(
                f"l2_norm[{red}]",
                l2_build,
                lambda i, red=red: ops.l2_norm_forward(i["z"], red),
                lambda d, c: {"z": ops.l2_norm_backward(d, c)},
                # vector_norm's backward is 0 at a zero row, npvae's documented subgradient
                lambda t, red=red: torch_reduce(torch.linalg.vector_norm(t["z"], dim=1), red, 1),
                ("z",),
            )
        )

    specs.append(
        OpSpec(
            "reparameterize",
            _same_shape_inputs(mu="value", logvar="logvar", eps="eps"),
            lambda i: ops.reparameterize_forward(i["mu"], i["logvar"], eps=i["eps"]),
            lambda d, c: dict(zip(("mu", "logvar"), ops.reparameterize_backward(d, c))),
            lambda t: t["mu"] + torch.exp(0.5 * t["logvar"]) * t["eps"],
            ("mu", "logvar"),
            lambda i: float(np.max(np.abs(i["mu"]) + np.abs(np.exp(0.5 * i["logvar"]) * i["eps"]))),
        )
    )

    def noise_build(src, r, margin):
        inputs = _same_shape_inputs(h="value", eps="eps")(src, r, margin)
        inputs["scale"] = src.uniform(0.0, 2.0)
        return inputs

    specs.append(
        OpSpec(
            "add_noise",
            noise_build,
            lambda i: ops.add_noise_forward(i["h"], eps=i["eps"], scale=i["scale"]),
            lambda d, c: {"h": ops.add_noise_backward(d, c)},
            lambda t: t["h"] + t["scale"] * t["eps"],
            ("h",),
            lambda i: float(np.max(np.abs(i["h"]) + abs(i["scale"]) * np.abs(i["eps"]))),
        )
    )
    specs.append(
        OpSpec(
            "continuous_bernoulli_mean",
            _same_shape_inputs(logits="logits"),
            lambda i: (ops.continuous_bernoulli_mean(i["logits"]), None),
            None,  # forward only
            lambda t: torch_cb_mean(t["logits"]),
        )
    )
    return specs


OP_SPECS: dict[str, OpSpec] = {spec.name: spec for spec in _specs()}


def to_torch(inputs: dict, wrt=()) -> dict:
    return {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=k in wrt) if isinstance(v, np.ndarray) else v
        for k, v in inputs.items()
    }


def torch_errors(spec: OpSpec, inputs: dict, src, floors: bool = True) -> dict[str, float]:
    """Run ours (active backend) and the torch reference on the same float64 inputs, with a random
    upstream gradient drawn from ``src``; relative errors of the forward and of each gradient
    (``floors=False``: the plain CS231n metric, without the spec's cancellation / saturation floors)."""
    out, cache = spec.forward(inputs)
    t = to_torch(inputs, spec.wrt)
    ref = spec.reference(t)
    floor = spec.scale(inputs) if spec.cancels and floors else 0.0
    errors = {"forward": rel_error(out, ref.detach().numpy(), floor=floor)}
    if spec.wrt:
        dout = draw_dout(src, out)
        grads = spec.backward(dout, cache)
        (ref * torch.as_tensor(dout, dtype=torch.float64)).sum().backward()
        grad_floors = spec.grad_floor(inputs, dout) if spec.grad_floor and floors else {}
        for k in spec.wrt:
            errors[k] = rel_error(grads[k], t[k].grad.numpy(), floor=grad_floors.get(k, 0.0))
    return errors


# ----------------------------------------------------------------------------- image ops (npvae.conv)
# Cases are dicts: stride, padding (int, pair, "valid", "same"), output_padding, kernel (pooling).
# Keras' "same" is not a torch padding mode for strides > 1 or even totals: the references pad (or
# crop) explicitly with the amounts npvae.conv's documented formulas give.


def _pad4(pads):
    """((top, bottom), (left, right)) as F.pad's (left, right, top, bottom)."""
    (t, b), (l, r) = pads
    return (l, r, t, b)


def torch_conv2d(x, w, b, case):
    """F.conv2d on an explicitly padded x."""
    from npvae import conv

    s = conv.as_pair(case["stride"], "stride", "t", 1)
    pads = conv.conv_pads(case["padding"], x.shape[2:], tuple(w.shape[2:]), s)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, _pad4(pads)), w, b, stride=s)


def torch_conv_transpose2d(x, w, b, case):
    """F.conv_transpose2d; Keras' "same" and "valid" as padding 0 and a crop (or appended zero rows)."""
    from npvae import conv

    F = torch.nn.functional
    p = case["padding"]
    if not isinstance(p, str):
        return F.conv_transpose2d(x, w, b, stride=case["stride"], padding=p, output_padding=case["output_padding"])
    s = conv.as_pair(case["stride"], "stride", "t", 1)
    full = F.conv_transpose2d(x, w, None, stride=s)
    crops = conv.transpose_crops(p, 0, tuple(w.shape[2:]), s)
    out = F.pad(full, tuple(-c for c in _pad4(crops)))  # negative pads crop; positive ones append zeros
    return out + b[:, None, None]


def torch_max_pool2d(x, case):
    """F.max_pool2d; Keras' "same" as an explicit -inf padding."""
    from npvae import conv

    F = torch.nn.functional
    k = conv.as_pair(case["kernel"], "kernel", "t", 1)
    s = k if case["stride"] is None else conv.as_pair(case["stride"], "stride", "t", 1)
    pads = conv.pool_pads(case["padding"], x.shape[2:], k, s)
    if isinstance(case["padding"], str):
        return F.max_pool2d(F.pad(x, _pad4(pads), value=-np.inf), k, s)
    return F.max_pool2d(x, k, s, padding=case["padding"])
