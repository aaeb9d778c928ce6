"""Tests for the image ops of :mod:`npvae.conv`, in both kernel backends.

1. Forward and every gradient against ``torch.nn.functional`` in float64 (relative error <= 1e-10),
   over Hypothesis-drawn batch, channels, sizes, kernels, strides and paddings (odd sizes, Keras
   "same" with its odd pixel at the bottom/right, kernels larger than the stride).
2. Every gradient against central finite differences (float64).
3. float32 runs stay float32 and agree with the float64 reference.
4. Max pooling's tie rule: the first maximum in row-major window order wins, as in PyTorch.
5. Errors name the op and the shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from npvae import conv
from npvae.backend import use_backend
from tests.helpers import (BACKENDS, numeric_gradient, rel_error, torch_conv2d, torch_conv_transpose2d,
                           torch_max_pool2d)

torch = pytest.importorskip("torch")
F = torch.nn.functional

TORCH_TOL = 1e-10
FD_TOL = 1e-6
F32_TOL = 2e-5
SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def _t(a, grad=True):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


# ----------------------------------------------------------------------------- strategies

sizes = st.integers(1, 9)
paddings = st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)),
                     st.sampled_from(["valid", "same"]))


@st.composite
def conv_cases(draw, transposed=False):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    s = conv.as_pair(stride, "stride", "t", 1)
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(sizes), draw(sizes))
    c_out = draw(st.integers(1, 3))
    case = {"shape": shape, "c_out": c_out, "kernel": kernel, "stride": stride}
    if transposed:
        case["padding"] = draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)),
                                         st.sampled_from(["valid", "same"])))
        case["output_padding"] = (0 if isinstance(case["padding"], str) else
                                  (draw(st.integers(0, s[0] - 1)), draw(st.integers(0, s[1] - 1))))
        try:
            conv.conv_transpose2d_output_shape(shape[1:], c_out, kernel, stride, case["padding"], case["output_padding"])
        except ValueError:
            assume(False)
    else:
        case["padding"] = draw(paddings)
        try:
            conv.conv2d_output_shape(shape[1:], c_out, kernel, stride, case["padding"])
        except ValueError:
            assume(False)
    case["seed"] = draw(st.integers(0, 2**31 - 1))
    return case


def _conv_inputs(case, dtype=np.float64):
    rng = np.random.default_rng(case["seed"])
    b, c, h, w = case["shape"]
    wshape = (c, case["c_out"], *case["kernel"]) if "output_padding" in case else (case["c_out"], c, *case["kernel"])
    return (rng.standard_normal((b, c, h, w)).astype(dtype), rng.standard_normal(wshape).astype(dtype),
            rng.standard_normal(case["c_out"]).astype(dtype), rng)


# ----------------------------------------------------------------------------- conv2d


@pytest.mark.parametrize("backend", BACKENDS)  # the loops (direct correlations, col2im) and their twins
@settings(max_examples=60, deadline=None, suppress_health_check=SLOW)
@given(case=conv_cases())
def test_conv2d_matches_torch(backend, case):
    x, w, b, rng = _conv_inputs(case)
    with use_backend(backend):
        y, cache = conv.conv2d_forward(x, w, b, case["stride"], case["padding"])
    tx, tw, tb = _t(x), _t(w), _t(b)
    ty = torch_conv2d(tx, tw, tb, case)
    assert y.shape == tuple(ty.shape)
    assert rel_error(y, ty.detach().numpy()) <= TORCH_TOL
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(dy))
    with use_backend(backend):
        dx, dw, db = conv.conv2d_backward(dy, cache)
    for ours, ref, name in ((dx, tx.grad, "dx"), (dw, tw.grad, "dw"), (db, tb.grad, "db")):
        assert rel_error(ours, ref.numpy()) <= TORCH_TOL, name


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=50, deadline=None, suppress_health_check=SLOW)
@given(case=conv_cases(transposed=True))
def test_conv_transpose2d_matches_torch(backend, case):
    x, w, b, rng = _conv_inputs(case)
    with use_backend(backend):
        y, cache = conv.conv_transpose2d_forward(x, w, b, case["stride"], case["padding"], case["output_padding"])
    tx, tw, tb = _t(x), _t(w), _t(b)
    ty = torch_conv_transpose2d(tx, tw, tb, case)
    assert y.shape == tuple(ty.shape)
    assert rel_error(y, ty.detach().numpy()) <= TORCH_TOL
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(dy))
    with use_backend(backend):
        dx, dw, db = conv.conv_transpose2d_backward(dy, cache)
    for ours, ref, name in ((dx, tx.grad, "dx"), (dw, tw.grad, "dw"), (db, tb.grad, "db")):
        assert rel_error(ours, ref.numpy()) <= TORCH_TOL, name


def test_keras_same_puts_the_odd_pixel_at_the_end():
    # 6 rows, kernel 3, stride 2: output 3 rows, total padding (3-1)*2 + 3 - 6 = 1, all at the bottom
    assert conv.conv_pads("same", (6, 7), (3, 3), (2, 2)) == ((0, 1), (1, 1))
    assert conv.conv_pads("same", (28, 28), (2, 2), (2, 2)) == ((0, 0), (0, 0))
    assert conv.pool_pads("same", (7, 7), (2, 2), (2, 2)) == ((0, 1), (0, 1))  # 7 -> 4 as in Keras
    assert conv.max_pool2d_output_shape((16, 7, 7), 2, 2, "same") == (16, 4, 4)
    # a transposed "same" doubles the size with stride 2, cropping the odd pixel at the bottom/right
    assert conv.conv_transpose2d_output_shape((64, 14, 14), 32, 3, 2, "same") == (32, 28, 28)
    assert conv.transpose_crops("same", 0, (3, 3), (2, 2)) == ((0, 1), (0, 1))


# ----------------------------------------------------------------------------- pooling and upsampling


@st.composite
def pool_cases(draw):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = draw(st.one_of(st.none(), st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = draw(st.one_of(st.tuples(st.integers(0, kernel[0] // 2), st.integers(0, kernel[1] // 2)),
                             st.sampled_from(["valid", "same"])))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(sizes), draw(sizes))
    try:
        conv.max_pool2d_output_shape(shape[1:], kernel, stride, padding)
    except ValueError:
        assume(False)
    ties = draw(st.booleans())  # small integers: many ties, which must go where torch sends them
    return {"kernel": kernel, "stride": stride, "padding": padding, "shape": shape, "ties": ties,
            "seed": draw(st.integers(0, 2**31 - 1))}


def _pool_input(case, dtype=np.float64):
    rng = np.random.default_rng(case["seed"])
    x = rng.integers(0, 3, case["shape"]) if case["ties"] else rng.standard_normal(case["shape"])
    return x.astype(dtype), rng


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None, suppress_health_check=SLOW)
@given(case=pool_cases())
def test_max_pool2d_matches_torch_ties_included(backend, case):
    x, rng = _pool_input(case)
    with use_backend(backend):
        y, cache = conv.max_pool2d_forward(x, case["kernel"], case["stride"], case["padding"])
        dy = rng.standard_normal(y.shape)
        dx = conv.max_pool2d_backward(dy, cache)
    tx = _t(x)
    ty = torch_max_pool2d(tx, case)
    ty.backward(torch.tensor(dy))
    assert y.shape == tuple(ty.shape)
    assert rel_error(y, ty.detach().numpy()) == 0.0
    assert rel_error(dx, tx.grad.numpy()) <= TORCH_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool2d_tie_goes_to_the_first_pixel_of_the_window(backend):
    # a constant image: every window ties; PyTorch (and npvae) send its gradient to its top-left pixel
    x = np.ones((1, 1, 4, 4))
    with use_backend(backend):
        y, cache = conv.max_pool2d_forward(x, 2, 2)
        dx = conv.max_pool2d_backward(np.ones_like(y), cache)
    expected = np.zeros((4, 4))
    expected[::2, ::2] = 1
    np.testing.assert_array_equal(dx[0, 0], expected)
    # overlapping windows (stride 1) whose tie resolves to the same pixel add up there
    x = np.array([[[[5.0, 5.0, 5.0]]]])
    with use_backend(backend):
        y, cache = conv.max_pool2d_forward(x, (1, 2), 1)
        dx = conv.max_pool2d_backward(np.array([[[[1.0, 10.0]]]]), cache)
    np.testing.assert_array_equal(dx[0, 0, 0], [1.0, 10.0, 0.0])
    tx = _t(x)
    F.max_pool2d(tx, (1, 2), 1).backward(torch.tensor([[[[1.0, 10.0]]]], dtype=torch.float64))
    np.testing.assert_array_equal(tx.grad.numpy()[0, 0, 0], [1.0, 10.0, 0.0])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, deadline=None, suppress_health_check=SLOW)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 3), sizes, sizes),
       scale=st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))),
       seed=st.integers(0, 2**31 - 1))
def test_upsample_matches_torch(backend, shape, scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    with use_backend(backend):
        y, cache = conv.upsample_nearest2d_forward(x, scale)
        dy = rng.standard_normal(y.shape)
        dx = conv.upsample_nearest2d_backward(dy, cache)
    s = conv.as_pair(scale, "scale", "t", 1)
    tx = _t(x)
    ty = F.interpolate(tx, scale_factor=s, mode="nearest")
    ty.backward(torch.tensor(dy))
    assert rel_error(y, ty.detach().numpy()) == 0.0
    assert rel_error(dx, tx.grad.numpy()) <= TORCH_TOL


# ----------------------------------------------------------------------------- finite differences


def _fd_check(f, inputs, name, dy, ours):
    numeric, noise = numeric_gradient(f, inputs, name, dy)
    assert rel_error(ours, numeric, floor=noise) <= FD_TOL, name


@settings(max_examples=8, deadline=None, suppress_health_check=SLOW)
@given(case=conv_cases())
def test_conv2d_finite_differences(case):
    x, w, b, rng = _conv_inputs(case)
    y, cache = conv.conv2d_forward(x, w, b, case["stride"], case["padding"])
    dy = rng.standard_normal(y.shape)
    dx, dw, db = conv.conv2d_backward(dy, cache)
    inputs = {"x": x, "w": w, "b": b}
    f = lambda d: conv.conv2d_forward(d["x"], d["w"], d["b"], case["stride"], case["padding"])[0]  # noqa: E731
    for name, ours in (("x", dx), ("w", dw), ("b", db)):
        _fd_check(f, inputs, name, dy, ours)


@settings(max_examples=8, deadline=None, suppress_health_check=SLOW)
@given(case=conv_cases(transposed=True))
def test_conv_transpose2d_finite_differences(case):
    x, w, b, rng = _conv_inputs(case)
    args = (case["stride"], case["padding"], case["output_padding"])
    y, cache = conv.conv_transpose2d_forward(x, w, b, *args)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = conv.conv_transpose2d_backward(dy, cache)
    inputs = {"x": x, "w": w, "b": b}
    f = lambda d: conv.conv_transpose2d_forward(d["x"], d["w"], d["b"], *args)[0]  # noqa: E731
    for name, ours in (("x", dx), ("w", dw), ("b", db)):
        _fd_check(f, inputs, name, dy, ours)


@settings(max_examples=8, deadline=None, suppress_health_check=SLOW)
@given(case=pool_cases())
def test_pool_and_upsample_finite_differences(case):
    case = {**case, "ties": False}  # away from ties, where max is not differentiable
    x, rng = _pool_input(case)
    y, cache = conv.max_pool2d_forward(x, case["kernel"], case["stride"], case["padding"])
    dy = rng.standard_normal(y.shape)
    f = lambda d: conv.max_pool2d_forward(d["x"], case["kernel"], case["stride"], case["padding"])[0]  # noqa: E731
    _fd_check(f, {"x": x}, "x", dy, conv.max_pool2d_backward(dy, cache))
    y, cache = conv.upsample_nearest2d_forward(x, (2, 3))
    dy = rng.standard_normal(y.shape)
    f = lambda d: conv.upsample_nearest2d_forward(d["x"], (2, 3))[0]  # noqa: E731
    _fd_check(f, {"x": x}, "x", dy, conv.upsample_nearest2d_backward(dy, cache))


# ----------------------------------------------------------------------------- float32


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10, deadline=None, suppress_health_check=SLOW)
@given(case=conv_cases(), tcase=conv_cases(transposed=True), pcase=pool_cases())
def test_float32_stays_float32_and_agrees(backend, case, tcase, pcase):
    x, w, b, rng = _conv_inputs(case, np.float32)
    with use_backend(backend):
        y, cache = conv.conv2d_forward(x, w, b, case["stride"], case["padding"])
        dy = rng.standard_normal(y.shape).astype(np.float32)
        grads = conv.conv2d_backward(dy, cache)
        y64, cache64 = conv.conv2d_forward(x.astype(np.float64), w, b, case["stride"], case["padding"])
        grads64 = conv.conv2d_backward(dy.astype(np.float64), cache64)
        for ours, ref in zip((y, *grads), (y64, *grads64)):
            assert ours.dtype == np.float32
            assert rel_error(ours, ref) <= F32_TOL

        x, w, b, rng = _conv_inputs(tcase, np.float32)
        args = (tcase["stride"], tcase["padding"], tcase["output_padding"])
        y, cache = conv.conv_transpose2d_forward(x, w, b, *args)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        grads = conv.conv_transpose2d_backward(dy, cache)
        y64, cache64 = conv.conv_transpose2d_forward(x.astype(np.float64), w, b, *args)
        grads64 = conv.conv_transpose2d_backward(dy.astype(np.float64), cache64)
        for ours, ref in zip((y, *grads), (y64, *grads64)):
            assert ours.dtype == np.float32
            assert rel_error(ours, ref) <= F32_TOL

        x, rng = _pool_input(pcase, np.float32)
        y, cache = conv.max_pool2d_forward(x, pcase["kernel"], pcase["stride"], pcase["padding"])
        dx = conv.max_pool2d_backward(np.ones_like(y), cache)
        u, ucache = conv.upsample_nearest2d_forward(x, 2)
        du = conv.upsample_nearest2d_backward(u, ucache)
        assert y.dtype == dx.dtype == u.dtype == du.dtype == np.float32


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_op_and_the_shapes():
    x = np.zeros((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"conv2d: kernel 5x5 is larger than the padded input 4x4 \(input 4x4"):
        conv.conv2d_forward(x, np.zeros((8, 3, 5, 5)))
    with pytest.raises(ValueError, match=r"conv2d: x has 3 channels .* expects 1"):
        conv.conv2d_forward(x, np.zeros((8, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"conv2d: unknown padding 'full'"):
        conv.conv2d_forward(x, np.zeros((8, 3, 3, 3)), padding="full")
    with pytest.raises(ValueError, match=r"conv2d: expected stride integers >= 1, got 0"):
        conv.conv2d_forward(x, np.zeros((8, 3, 3, 3)), stride=0)
    with pytest.raises(ValueError, match=r"conv2d: expected x of shape \(B, C, H, W\), got \(3, 4, 4\)"):
        conv.conv2d_forward(x[0], np.zeros((8, 3, 3, 3)))
    with pytest.raises(TypeError, match="float32 or float64"):
        conv.conv2d_forward(x.astype(int), np.zeros((8, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"conv2d: expected b of shape \(8,\)"):
        conv.conv2d_forward(x, np.zeros((8, 3, 3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match=r"output_padding \(2, 2\) must be smaller than the stride \(2, 2\)"):
        conv.conv_transpose2d_forward(x, np.zeros((3, 2, 3, 3)), stride=2, output_padding=(2, 2))
    with pytest.raises(ValueError, match=r"conv_transpose2d: input 1x1 .* gives an empty output"):
        conv.conv_transpose2d_forward(x[:, :, :1, :1], np.zeros((3, 2, 1, 1)), padding=1)
    with pytest.raises(ValueError, match=r"max_pool2d: padding 2 must be at most half the kernel \(2, 2\)"):
        conv.max_pool2d_forward(x, 2, padding=2)
    with pytest.raises(ValueError, match=r"max_pool2d: kernel 5x5 is larger than the padded input 4x4"):
        conv.max_pool2d_forward(x, 5)
    with pytest.raises(ValueError, match=r"upsample_nearest2d: expected scale integers >= 1"):
        conv.upsample_nearest2d_forward(x, 0)


@settings(max_examples=10, deadline=None, suppress_health_check=SLOW + [HealthCheck.function_scoped_fixture])
@given(case=conv_cases(), tcase=conv_cases(transposed=True))
def test_chunked_columns_give_the_same_numbers(monkeypatch, case, tcase):
    """The column matrix is built a chunk of images at a time: with one image per chunk, and no whole
    batch's columns kept for the weight gradient (so it rebuilds them), every op and gradient still
    matches torch. (The other tests keep them: their batches fit.)"""
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1)
    monkeypatch.setattr(conv, "KEEP_COLS_BYTES", 0)
    x, w, b, rng = _conv_inputs(case)
    y, cache = conv.conv2d_forward(x, w, b, case["stride"], case["padding"])
    dy = rng.standard_normal(y.shape)
    ours = (y, *conv.conv2d_backward(dy, cache))
    tx, tw, tb = _t(x), _t(w), _t(b)
    ty = torch_conv2d(tx, tw, tb, case)
    ty.backward(torch.tensor(dy))
    for a, ref in zip(ours, (ty.detach(), tx.grad, tw.grad, tb.grad)):
        assert rel_error(a, ref.numpy()) <= TORCH_TOL
    x, w, b, rng = _conv_inputs(tcase)
    args = (tcase["stride"], tcase["padding"], tcase["output_padding"])
    y, cache = conv.conv_transpose2d_forward(x, w, b, *args)
    dy = rng.standard_normal(y.shape)
    ours = (y, *conv.conv_transpose2d_backward(dy, cache))
    tx, tw, tb = _t(x), _t(w), _t(b)
    ty = torch_conv_transpose2d(tx, tw, tb, tcase)
    ty.backward(torch.tensor(dy))
    for a, ref in zip(ours, (ty.detach(), tx.grad, tw.grad, tb.grad)):
        assert rel_error(a, ref.numpy()) <= TORCH_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu", "sigmoid", "tanh", "softplus"])
def test_bias_activation_forward_is_the_bias_then_the_activation(backend, activation):
    """The fused pass of the conv layers equals adding the bias, then ops.activation_forward; its
    cache serves ops.activation_backward."""
    from npvae import ops

    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 4, 5, 6)) * 3
    b = rng.standard_normal(4)
    with use_backend(backend):
        y, cache = conv.bias_activation_forward(a.copy(), b, activation, 0.1)
        ref, ref_cache = ops.activation_forward((a + b[:, None, None]).reshape(3, -1), activation, 0.1)
        dy = rng.standard_normal(y.shape)
        da = ops.activation_backward(dy.reshape(3, -1), cache)
        ref_da = ops.activation_backward(dy.reshape(3, -1), ref_cache)
    assert rel_error(y.reshape(3, -1), ref) <= 1e-15
    assert rel_error(da, ref_da) <= 1e-15
    with pytest.raises(ValueError, match="bias_activation_forward: expected a C-contiguous y"):
        conv.bias_activation_forward(a[:, :, :, ::2], b, activation)
