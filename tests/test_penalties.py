"""Tests for :mod:`npvae.penalties`: the sparsity and contractive penalties and their hand-derived gradients.

1. Against PyTorch autograd in float64: the contractive penalty's Jacobian is taken by autograd with
   ``create_graph=True`` and its squared norm differentiated again (double backward), over stack depths,
   widths, activations and weight scales drawn by Hypothesis; loss and every gradient to 1e-9 (relative
   to the array's scale, :func:`tests.helpers.rel_error`).
2. Central finite differences of the same functions (smooth activations, float64).
3. The one-layer closed form, float32, reductions and bad input.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npvae import ops, penalties
from tests.helpers import numeric_gradient, rel_error

torch = pytest.importorskip("torch")
from tests.torch_models import torch_activation  # noqa: E402

RTOL = 1e-9
examples = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)
SMOOTH = ("identity", "sigmoid", "tanh", "softplus")


def dense_stack(x, weights, biases, activations, alpha):
    """ops.dense_forward over the layers (copies of the outputs, as a model's distinct buffers); the caches."""
    caches, h = [], x
    for w, b, act in zip(weights, biases, activations):
        h, cache = ops.dense_forward(h, w, b, act, alpha)
        caches.append(cache)
    return caches


def draw_stack(rng, sizes, scale, batch, dtype=np.float64):
    x = rng.standard_normal((batch, sizes[0])).astype(dtype)
    weights = [(scale * rng.standard_normal((o, i)) / np.sqrt(i)).astype(dtype) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [rng.standard_normal(o).astype(dtype) for o in sizes[1:]]
    return x, weights, biases


def torch_contraction(x, weights, biases, activations, alpha):
    """||J_i||_F^2 per example (B,) with J from autograd (create_graph, so it can be differentiated again)."""
    h = x
    for w, b, act in zip(weights, biases, activations):
        h = torch_activation(act, alpha)(h @ w.T + b)
    rows = []
    for j in range(h.shape[1]):  # one row of every example's Jacobian per unit: (B, D)
        (dj,) = torch.autograd.grad(h[:, j].sum(), x, create_graph=True)
        rows.append((dj**2).sum(1))
    return torch.stack(rows, 1).sum(1)


# ----------------------------------------------------------------------------- 1. against torch


@examples
@given(sizes=st.lists(st.integers(1, 7), min_size=2, max_size=5), batch=st.integers(1, 6),
       data=st.data(), alpha=st.sampled_from([0.0, 0.01, 0.3]), scale=st.sampled_from([0.3, 1.0, 3.0]),
       reduction=st.sampled_from(ops.REDUCTIONS), seed=seeds)
def test_contractive_penalty_matches_torch_double_backward(sizes, batch, data, alpha, scale, reduction, seed):
    activations = data.draw(st.lists(st.sampled_from(list(ops.ACTIVATIONS)), min_size=len(sizes) - 1,
                                     max_size=len(sizes) - 1), "activations")
    rng = np.random.default_rng(seed)
    x, weights, biases = draw_stack(rng, sizes, scale, batch)
    value, cache = penalties.contractive_penalty_forward(dense_stack(x, weights, biases, activations, alpha), reduction)
    dloss = rng.standard_normal(batch) if reduction == "none" else rng.standard_normal()
    dx, dws, dbs = penalties.contractive_penalty_backward(dloss, cache)

    tx = torch.tensor(x, requires_grad=True)
    tw = [torch.tensor(w, requires_grad=True) for w in weights]
    tb = [torch.tensor(b, requires_grad=True) for b in biases]
    rows = torch_contraction(tx, tw, tb, activations, alpha)
    expected = {"none": rows, "sum": rows.sum(), "batchmean": rows.mean(),
                "mean": rows.sum() / (batch * sizes[0] * sizes[-1])}[reduction]
    assert rel_error(value, expected.detach().numpy(), floor=1e-12) <= RTOL
    grads = torch.autograd.grad((expected * torch.tensor(dloss, dtype=torch.float64)).sum(), [tx, *tw, *tb], allow_unused=True)
    grads = [np.zeros(t.shape) if g is None else g.numpy() for g, t in zip(grads, [tx, *tw, *tb])]
    scale_floor = 1e-12 * max(float(np.abs(g).max(initial=0)) for g in grads)  # terms behind a saturated unit
    for name, ours, theirs in zip(["x"] + [f"w{i}" for i in range(len(tw))] + [f"b{i}" for i in range(len(tb))],
                                  [dx, *dws, *dbs], grads):
        err = rel_error(ours, theirs, floor=scale_floor)
        assert err <= RTOL, f"d{name}: relative error {err:.1e} vs torch ({activations}, sizes {sizes})"


@examples
@given(b=st.integers(1, 8), h=st.integers(1, 9), reduction=st.sampled_from(ops.REDUCTIONS), seed=seeds)
def test_l1_activity_matches_torch(b, h, reduction, seed):
    rng = np.random.default_rng(seed)
    code = rng.standard_normal((b, h)) * rng.choice([0.0, 1.0], size=(b, h), p=[0.2, 0.8])  # exact zeros too
    value, cache = penalties.l1_activity_forward(code, reduction)
    dloss = rng.standard_normal(b) if reduction == "none" else rng.standard_normal()
    dh = penalties.l1_activity_backward(dloss, cache)
    t = torch.tensor(code, requires_grad=True)
    rows = t.abs().sum(1)
    expected = {"none": rows, "sum": rows.sum(), "batchmean": rows.mean(), "mean": t.abs().mean()}[reduction]
    (expected * torch.tensor(dloss, dtype=torch.float64)).sum().backward()
    assert rel_error(value, expected.detach().numpy()) <= 1e-12
    assert rel_error(dh, t.grad.numpy()) <= 1e-12


@examples
@given(b=st.integers(1, 8), h=st.integers(1, 9), rho=st.sampled_from([0.01, 0.05, 0.5, 0.9]),
       spread=st.sampled_from([1.0, 4.0, 12.0]), seed=seeds)
def test_kl_sparsity_matches_torch(b, h, rho, spread, seed):
    rng = np.random.default_rng(seed)
    # saturated, but not to exactly 0 or 1 (where torch's log is infinite and npvae's documented clamp acts)
    code = np.clip(1 / (1 + np.exp(-spread * rng.standard_normal((b, h)))), 1e-9, 1 - 1e-9)
    value, cache = penalties.kl_sparsity_forward(code, rho)
    dloss = rng.standard_normal()
    dh = penalties.kl_sparsity_backward(dloss, cache)
    t = torch.tensor(code, requires_grad=True)
    rho_hat = t.mean(0)
    expected = (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()
    (expected * dloss).backward()
    assert rel_error(value, expected.item(), floor=1e-12) <= 1e-12
    # torch's gradient is the difference (1 - rho) / (1 - rho_hat) - rho / rho_hat, which cancels near rho:
    # its error is relative to those terms (ours is computed as (rho_hat - rho) / (rho_hat (1 - rho_hat)))
    r = code.mean(0)
    terms = abs(dloss) / b * float(np.max(rho / r + (1 - rho) / (1 - r)))
    assert rel_error(dh, t.grad.numpy(), floor=terms) <= 1e-12


@examples
@given(name=st.sampled_from(list(ops.ACTIVATIONS)), alpha=st.sampled_from([0.0, 0.3]), seed=seeds)
def test_activation_derivatives_match_torch(name, alpha, seed):
    a = np.random.default_rng(seed).standard_normal((3, 5)) * 4
    y, _ = ops.activation_forward(a, name, alpha)
    d1, d2 = penalties.activation_derivatives(y, name, alpha)
    t = torch.tensor(a, requires_grad=True)
    (g1,) = torch.autograd.grad(torch_activation(name, alpha)(t).sum(), t, create_graph=True)
    # piecewise-linear activations: autograd's first derivative is a constant with no graph, f'' = 0
    g2 = torch.autograd.grad(g1.sum(), t)[0] if g1.requires_grad else torch.zeros_like(t)
    assert rel_error(d1, g1.detach().numpy()) <= 1e-12
    assert rel_error(d2, g2.numpy(), floor=1e-12) <= 1e-12


# ----------------------------------------------------------------------------- 2. finite differences


@settings(examples, max_examples=10)
@given(sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4), batch=st.integers(1, 4), data=st.data(),
       seed=seeds)
def test_contractive_penalty_finite_differences(sizes, batch, data, seed):
    activations = data.draw(st.lists(st.sampled_from(SMOOTH), min_size=len(sizes) - 1, max_size=len(sizes) - 1))
    rng = np.random.default_rng(seed)
    x, weights, biases = draw_stack(rng, sizes, 1.0, batch)
    inputs = {"x": x, **{f"w{i}": w for i, w in enumerate(weights)}, **{f"b{i}": b for i, b in enumerate(biases)}}
    n = len(weights)

    def penalty(inp):
        caches = dense_stack(inp["x"], [inp[f"w{i}"] for i in range(n)], [inp[f"b{i}"] for i in range(n)],
                             activations, 0.01)
        return penalties.contractive_penalty_forward(caches, "none")[0]

    dloss = rng.standard_normal(batch)
    _, cache = penalties.contractive_penalty_forward(dense_stack(x, weights, biases, activations, 0.01), "none")
    dx, dws, dbs = penalties.contractive_penalty_backward(dloss, cache)
    for name, ours in zip(inputs, [dx, *dws, *dbs]):
        numeric, noise = numeric_gradient(penalty, inputs, name, dloss, h=1e-5, truncation=True)
        err = rel_error(ours, numeric, floor=1e-6)
        assert err <= 1e-6 or np.abs(ours - numeric).max() <= 2 * noise, f"d{name}: {err:.1e}"


def test_kl_sparsity_and_l1_finite_differences():
    rng = np.random.default_rng(0)
    code = 1 / (1 + np.exp(-rng.standard_normal((5, 4))))
    _, cache = penalties.kl_sparsity_forward(code, 0.1)
    numeric, _ = numeric_gradient(lambda inp: penalties.kl_sparsity_forward(inp["h"], 0.1)[0], {"h": code}, "h", 1.0)
    assert rel_error(penalties.kl_sparsity_backward(1.0, cache), numeric) <= 1e-7
    _, cache = penalties.l1_activity_forward(code - 0.5, "sum")
    numeric, _ = numeric_gradient(lambda inp: penalties.l1_activity_forward(inp["h"], "sum")[0],
                                  {"h": code - 0.5}, "h", 1.0)
    assert rel_error(penalties.l1_activity_backward(1.0, cache), numeric) <= 1e-7


# ----------------------------------------------------------------------------- 3. closed form, float32, errors


def test_one_layer_sigmoid_is_the_closed_form():
    """Rifai et al.'s formula: sum_j (h_j (1 - h_j))^2 ||W_j||^2, and the same as the explicit Jacobian."""
    rng = np.random.default_rng(1)
    x, (w,), (b,) = draw_stack(rng, [6, 4], 1.0, 3)
    h, cache = ops.dense_forward(x, w, b, "sigmoid")
    rows, _ = penalties.contractive_penalty_forward([cache])
    np.testing.assert_allclose(rows, ((h * (1 - h)) ** 2 * (w**2).sum(1)).sum(1), rtol=1e-14)
    jacobians = (h * (1 - h))[:, :, None] * w  # (B, H, D)
    np.testing.assert_allclose(penalties.jacobian_frobenius([cache]), np.linalg.norm(jacobians, axis=(1, 2)),
                               rtol=1e-14)


def test_deep_stack_equals_the_explicit_jacobian():
    rng = np.random.default_rng(2)
    acts = ["tanh", "softplus", "sigmoid"]
    x, weights, biases = draw_stack(rng, [7, 5, 6, 3], 1.0, 4)
    caches = dense_stack(x, weights, biases, acts, 0.01)
    jac = np.broadcast_to(np.eye(7), (4, 7, 7))
    for cache, act in zip(caches, acts):
        d1, _ = penalties.activation_derivatives(cache[2], act)
        jac = d1[:, :, None] * (cache[1] @ jac)
    rows, _ = penalties.contractive_penalty_forward(caches)
    np.testing.assert_allclose(rows, (jac**2).sum((1, 2)), rtol=1e-13)


@pytest.mark.parametrize("depth", [1, 3])
def test_float32_stays_float32_and_close_to_float64(depth):
    rng = np.random.default_rng(3)
    sizes = [8, 6, 5, 4][: depth + 1]
    x, weights, biases = draw_stack(rng, sizes, 1.0, 5)
    results = {}
    for dtype in (np.float32, np.float64):
        caches = dense_stack(x.astype(dtype), [w.astype(dtype) for w in weights], [b.astype(dtype) for b in biases],
                             ["tanh"] * (depth - 1) + ["sigmoid"], 0.01)
        rows, cache = penalties.contractive_penalty_forward(caches)
        dx, dws, dbs = penalties.contractive_penalty_backward(np.ones(5, dtype), cache)
        assert all(a.dtype == dtype for a in (rows, dx, *dws, *dbs))
        results[dtype] = (rows, dx, *dws, *dbs)
    for a, b in zip(results[np.float32], results[np.float64]):
        assert rel_error(a, b) <= 1e-5


def test_bad_input_is_refused_with_one_clear_error():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match=r"codes in \[0, 1\]"):
        penalties.kl_sparsity_forward(rng.standard_normal((3, 2)), 0.05)
    with pytest.raises(ValueError, match=r"target rho in \(0, 1\)"):
        penalties.kl_sparsity_forward(rng.random((3, 2)), 1.0)
    with pytest.raises(ValueError, match="scalar dloss"):
        penalties.kl_sparsity_backward(np.ones(3), penalties.kl_sparsity_forward(rng.random((3, 2)), 0.1)[1])
    with pytest.raises(ValueError, match="non-empty list of dense_forward caches"):
        penalties.contractive_penalty_forward([])
    x, (w1, w2), (b1, b2) = draw_stack(rng, [4, 3, 2], 1.0, 2)
    _, c1 = ops.dense_forward(x, w1, b1, "tanh")
    _, c2 = ops.dense_forward(x, np.ones((2, 4)), b2, "tanh")
    with pytest.raises(ValueError, match="layer 1: its input"):
        penalties.contractive_penalty_forward([c1, c2])
    with pytest.raises(ValueError, match="unknown reduction"):
        penalties.contractive_penalty_forward([c1], "avg")
    with pytest.raises(ValueError, match=r"dloss of shape \(2,\)"):
        penalties.contractive_penalty_backward(np.ones(3), penalties.contractive_penalty_forward([c1])[1])


def test_kl_sparsity_clamps_a_saturated_mean_with_zero_gradient():
    code = np.array([[1.0, 0.3], [1.0, 0.6]], dtype=np.float32)  # unit 0's mean is exactly 1
    value, cache = penalties.kl_sparsity_forward(code, 0.05)
    assert np.isfinite(value)
    dh = penalties.kl_sparsity_backward(1.0, cache)
    assert np.all(dh[:, 0] == 0) and np.all(dh[:, 1] != 0)


# ----------------------------------------------------------------------------- the batch's code norm


@examples
@given(b=st.integers(1, 8), z=st.integers(1, 6), scale=st.sampled_from([1e-3, 1.0, 30.0]), seed=seeds)
def test_batch_l2_norm_matches_torch(b, z, scale, seed):
    """One norm of the whole batch, ``z.pow(2).sum().sqrt()`` as the poor man's VAE's write-up computes it."""
    rng = np.random.default_rng(seed)
    codes = scale * rng.standard_normal((b, z))
    value, cache = penalties.batch_l2_norm_forward(codes)
    dloss = rng.standard_normal()
    dz = penalties.batch_l2_norm_backward(dloss, cache)
    t = torch.tensor(codes, requires_grad=True)
    expected = t.pow(2).sum().sqrt()
    (expected * dloss).backward()
    assert rel_error(value, expected.item()) <= 1e-12
    assert rel_error(dz, t.grad.numpy()) <= 1e-12


def test_batch_l2_norm_finite_differences_and_its_subgradient_at_zero():
    rng = np.random.default_rng(3)
    codes = rng.standard_normal((5, 3))
    value, cache = penalties.batch_l2_norm_forward(codes)
    assert value == pytest.approx(np.linalg.norm(codes), rel=1e-15)
    assert value == pytest.approx(np.sqrt(5) * np.linalg.norm(codes, axis=1).mean(), rel=0.5)  # ~sqrt(B) x a row's
    numeric, noise = numeric_gradient(lambda d: penalties.batch_l2_norm_forward(d["z"])[0], {"z": codes}, "z", 0.7)
    assert rel_error(penalties.batch_l2_norm_backward(0.7, cache), numeric) <= 1e-8 + noise
    zero = np.zeros((4, 2))
    value, cache = penalties.batch_l2_norm_forward(zero)
    t = torch.zeros((4, 2), dtype=torch.float64, requires_grad=True)
    torch.linalg.vector_norm(t).backward()  # torch's norm takes 0 there too (the write-up's sqrt of the sum: NaN)
    assert value == 0 and np.array_equal(penalties.batch_l2_norm_backward(1.0, cache), t.grad.numpy())
    f32, _ = penalties.batch_l2_norm_forward(codes.astype(np.float32))
    assert f32.dtype == np.float32 and f32 == pytest.approx(np.linalg.norm(codes), rel=1e-6)
    with pytest.raises(ValueError, match="scalar dloss"):
        penalties.batch_l2_norm_backward(np.ones(5), cache)
