"""Tests of npvae.layers: the Layer protocol, Sequential, Flatten/Reshape/Activation, the workspace and specs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from npvae.layers import (Activation, Dense, Flatten, Parameters, Reshape, Sequential, Workspace, layer_from_spec,
                          layer_spec, mlp)

from tests.helpers import rel_error


def bind(stack: Sequential, dtype=np.float64, seed: int = 0) -> Parameters:
    """Bind a stack's leaves to one flat buffer, as a model does."""
    leaves = list(stack.named_layers("s"))
    params = Parameters({f"{p}.{n}": s for p, layer in leaves for n, s in layer.param_shapes().items()}, dtype)
    workspace = Workspace(dtype)
    rng = np.random.default_rng(seed)
    for path, layer in leaves:
        names = layer.param_shapes()
        layer.bind({n: params.value(f"{path}.{n}") for n in names}, {n: params.gradient(f"{path}.{n}") for n in names},
                   workspace, path)
        layer.init(rng)
    stack.bind({}, {}, workspace, "s")
    return params


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 5), h=st.integers(1, 4), w=st.integers(1, 4), hidden=st.integers(1, 6),
       act=st.sampled_from(["relu", "tanh", "sigmoid", "softplus", "leaky_relu"]), seed=st.integers(0, 2**31 - 1))
def test_sequential_gradients_match_torch(b, h, w, hidden, act, seed):
    """Flatten -> Dense -> Activation -> Dense -> Reshape, forward and backward, against torch in float64."""
    stack = Sequential(Flatten(), Dense(h * w, hidden), Activation(act), Dense(hidden, h * w, "sigmoid"), Reshape((h, w)))
    assert stack.output_shape((h, w)) == (h, w)
    bind(stack, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w))
    dy = rng.standard_normal((b, h, w))
    y = stack.forward(x).copy()
    dx = stack.backward(dy).copy()
    d0, d1 = stack[1], stack[3]
    t = {k: torch.tensor(v, requires_grad=True) for k, v in
         {"x": x, "w0": d0.weight, "b0": d0.bias, "w1": d1.weight, "b1": d1.bias}.items()}
    f = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
         "softplus": lambda a: torch.log1p(torch.exp(-a.abs())) + a.clamp(min=0),
         "leaky_relu": lambda a: torch.nn.functional.leaky_relu(a, 0.01)}[act]
    a = f(t["x"].reshape(b, -1) @ t["w0"].T + t["b0"])
    yt = torch.sigmoid(a @ t["w1"].T + t["b1"]).reshape(b, h, w)
    (yt * torch.tensor(dy)).sum().backward()
    assert rel_error(y, yt.detach().numpy()) <= 1e-12
    assert dx.shape == x.shape and rel_error(dx, t["x"].grad.numpy()) <= 1e-10
    for layer, wk, bk in ((d0, "w0", "b0"), (d1, "w1", "b1")):
        assert rel_error(layer.dweight, t[wk].grad.numpy()) <= 1e-10
        assert rel_error(layer.dbias, t[bk].grad.numpy()) <= 1e-10


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 4), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_reshape_layers_match_central_differences(b, shape, seed):
    """The parameter-free layers' backward, checked numerically: L = sum(dy * layer(x))."""
    size = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    for layer, in_shape in ((Flatten(), tuple(shape)), (Reshape(tuple(shape)), (size,)),
                            (Activation("tanh"), tuple(shape))):
        x = rng.standard_normal((b, *in_shape))
        dy = rng.standard_normal((b, *layer.output_shape(in_shape)))
        layer.forward(x)
        dx = layer.backward(dy)
        numeric = np.empty_like(x)
        for i in np.ndindex(x.shape):
            old = x[i]
            x[i] = old + 1e-6
            up = float((dy * layer.forward(x)).sum())
            x[i] = old - 1e-6
            down = float((dy * layer.forward(x)).sum())
            x[i] = old
            numeric[i] = (up - down) / 2e-6
        assert rel_error(dx, numeric) <= 1e-7, layer


def test_backward_without_dx_skips_the_layers_below_the_first_parameters():
    stack = Sequential(Flatten(), Dense(6, 3), Activation("relu"))
    bind(stack)
    stack.forward(np.ones((2, 2, 3)))
    assert stack.backward(np.ones((2, 3)), need_dx=False) is None
    assert Sequential(Flatten()).backward(np.ones((2, 3)), need_dx=False) is None


def test_shapes_that_do_not_fit_name_the_layer():
    with pytest.raises(ValueError, match=r"Dense\(5 -> 3\) expects inputs of shape \(B, 5\), got \(B, 2, 3\) \(add a Flatten"):
        Sequential(Dense(5, 3)).output_shape((2, 3))
    with pytest.raises(ValueError, match="cannot reshape inputs of shape \\(B, 7\\)"):
        Reshape((2, 3)).output_shape((7,))
    with pytest.raises(ValueError, match="positive integer"):
        Dense(1.7, 3)
    with pytest.raises(TypeError, match="item 1 is a int"):
        Sequential(Dense(2, 2), 3)
    with pytest.raises(ValueError, match="unknown activation"):
        Activation("gelu")


def test_workspace_reuses_buffers_and_keeps_a_bounded_number_of_batch_sizes():
    ws = Workspace(np.float32, max_batch_sizes=3)
    a = ws.get(4, "y", (4, 2))
    assert ws.get(4, "y", (4, 2)) is a and a.dtype == np.float32
    for batch in (5, 6, 7):
        ws.get(batch, "y", (batch, 2))
    assert len(ws) == 3 and ws.get(4, "y", (4, 2)) is not a  # size 4 was the least recently used
    assert ws.get(5, "mask", (5,), bool).dtype == bool


def test_specs_round_trip_and_refuse_unknown_types():
    stack = Sequential(Flatten(), mlp([6, 4, 2], "tanh", "sigmoid"), Reshape((2,)), Activation("leaky_relu", 0.2))
    spec = layer_spec(stack)
    rebuilt = layer_from_spec(spec)
    assert repr(rebuilt) == repr(stack) and layer_spec(rebuilt) == spec
    with pytest.raises(ValueError, match="unknown layer type 'Lambda'"):
        layer_from_spec({"type": "Lambda", "code": "import os"})
    with pytest.raises(ValueError, match="does not fit Dense"):
        layer_from_spec({"type": "Dense", "in_dim": 2})


def test_reprs_are_readable():
    assert repr(Sequential(Flatten(), Dense(784, 400, "relu"), Dense(400, 20))) == \
        "Sequential(Flatten(), Dense(784 -> 400, relu), Dense(400 -> 20))"
    assert repr(Reshape((28, 28))) == "Reshape((28, 28))"
