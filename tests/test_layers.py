"""Tests of npvae.layers: the Layer protocol, Sequential, Flatten/Reshape/Activation, the workspace and specs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from npvae.layers import (LAYER_TYPES, Activation, Conv2d, ConvTranspose2d, Dense, Flatten, GaussianHeads, Layer,
                          MaxPool2d, Parameters, Reshape, Sequential, Upsample2d, Workspace, layer_from_spec, layer_spec,
                          mlp)

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
    with pytest.raises(ValueError, match=r"^layer spec does not fit Dense: missing key 'out_dim' \(expected in_dim, "
                                         r"out_dim, activation, alpha\)$"):
        layer_from_spec({"type": "Dense", "in_dim": 2})
    with pytest.raises(ValueError, match=r"^layer spec does not fit Dense: unknown key 'bias'"):
        layer_from_spec({"type": "Dense", "in_dim": 2, "out_dim": 3, "bias": False})
    with pytest.raises(ValueError, match=r"^layer spec does not fit Flatten: unknown key 'dims' \(it takes none\)$"):
        layer_from_spec({"type": "Flatten", "dims": 2})
    with pytest.raises(ValueError, match=r"^expected a Sequential spec with one key, 'layers'"):
        layer_from_spec({"type": "Sequential", "layers": {}})
    with pytest.raises(ValueError, match=r"^expected names two different non-empty strings"):
        layer_from_spec({"type": "GaussianHeads", "in_dim": 2, "latent_dim": 1, "names": ["mu", "mu"]})
    with pytest.raises(ValueError, match=r"^unknown activation 'gelu': expected one of identity, relu"):
        layer_from_spec({"type": "Activation", "name": "gelu"})


# one of each layer type npvae defines, for the registry's round trip
EXAMPLES = [Dense(3, 2, "leaky_relu", 0.3), GaussianHeads(4, 2, ("prior_mu", "prior_logvar")), Activation("tanh"),
            Flatten(), Reshape((2, 3)), Conv2d(1, 2, (3, 1), 2, "same", "softplus"),
            ConvTranspose2d(2, 1, 3, 2, 1, 1, "sigmoid"), MaxPool2d(3, 2, "same"), Upsample2d((1, 2)),
            Sequential(Flatten(), Sequential(Dense(6, 2)))]


def test_every_layer_type_registers_itself_and_describes_its_own_config():
    assert {type(layer) for layer in EXAMPLES} == {cls for cls in LAYER_TYPES.values() if cls.__module__ == "npvae.layers"}
    for layer in EXAMPLES:
        spec = layer_spec(layer)
        assert spec == {"type": type(layer).__name__, **layer.get_config()}
        again = layer_from_spec(json.loads(json.dumps(spec)))
        assert type(again) is type(layer) and repr(again) == repr(layer) and layer_spec(again) == spec


def test_a_layer_of_ones_own_is_a_spec_type_by_defining_it():
    class Scale(Layer):
        def __init__(self, factor: float = 2.0, axes=(1,)):
            self.factor, self.axes = float(factor), tuple(axes)

    assert LAYER_TYPES["Scale"] is Scale
    assert layer_spec(Scale(3.0)) == {"type": "Scale", "factor": 3.0, "axes": [1]}
    assert layer_from_spec({"type": "Scale", "factor": 0.5}).factor == 0.5

    class Scale(Layer):  # noqa: F811 - defined again (a notebook cell run twice): the new class replaces it
        def __init__(self, factor: float = 2.0):
            self.factor = factor

    assert LAYER_TYPES["Scale"] is Scale

    class Hidden(Layer, register=False):
        pass

    assert "Hidden" not in LAYER_TYPES
    with pytest.raises(TypeError, match="Hidden has no spec"):
        layer_spec(Hidden())

    class Forgetful(Layer, register=False):
        def __init__(self, size: int):
            pass

    with pytest.raises(TypeError, match=r"Forgetful.get_config: no attribute 'size'"):
        Forgetful(2).get_config()
    with pytest.raises(ValueError, match=r"layer type 'Dense' is registered twice"):
        class Dense(Layer):  # noqa: F811 - a second class of a taken name
            pass


def test_reprs_are_readable():
    assert repr(Sequential(Flatten(), Dense(784, 400, "relu"), Dense(400, 20))) == \
        "Sequential(Flatten(), Dense(784 -> 400, relu), Dense(400 -> 20))"
    assert repr(Reshape((28, 28))) == "Reshape((28, 28))"


# ----------------------------------------------------------------------------- image layers


def torch_twin(layer, in_shape):
    """One npvae layer as torch modules with its weights (Keras' "same" padding as an explicit pad)."""
    from npvae import conv

    nn = torch.nn
    acts = {"relu": nn.ReLU(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "identity": nn.Identity()}

    def pad(pads, value=0.0):
        (t, b), (l, r) = pads
        return nn.ConstantPad2d((l, r, t, b), value)

    if isinstance(layer, ConvTranspose2d):
        m = nn.ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                               layer.padding, layer.output_padding).double()
        mods = [m, acts[layer.activation]]
    elif isinstance(layer, Conv2d):
        m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride).double()
        mods = [pad(conv.conv_pads(layer.padding, in_shape[1:], layer.kernel_size, layer.stride)), m,
                acts[layer.activation]]
    elif isinstance(layer, Dense):
        m = nn.Linear(layer.in_dim, layer.out_dim).double()
        mods = [m, acts[layer.activation]]
    elif isinstance(layer, MaxPool2d):
        return nn.Sequential(pad(conv.pool_pads(layer.padding, in_shape[1:], layer.kernel_size, layer.stride), -np.inf),
                             nn.MaxPool2d(layer.kernel_size, layer.stride))
    elif isinstance(layer, Upsample2d):
        return nn.Upsample(scale_factor=layer.scale, mode="nearest")
    elif isinstance(layer, Flatten):
        return nn.Flatten()
    else:
        return nn.Unflatten(1, layer.shape)
    m.weight.data, m.bias.data = torch.tensor(layer.weight.copy()), torch.tensor(layer.bias.copy())
    return nn.Sequential(*mods)


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 3), size=st.integers(5, 9), seed=st.integers(0, 2**31 - 1),
       act=st.sampled_from(["relu", "tanh", "sigmoid"]))
def test_image_stack_matches_torch(b, size, seed, act):
    """Conv(same) -> MaxPool(same) -> Conv(stride 2) -> Flatten -> Dense -> Reshape -> ConvTranspose ->
    Upsample -> Conv, forward and every gradient against the torch twin in float64."""
    stack = Sequential(Conv2d(2, 3, 3, padding="same", activation=act), MaxPool2d(2, padding="same"),
                       Conv2d(3, 4, (3, 2), stride=2, padding=1, activation="relu"), Flatten())
    in_shape = (2, size, size)
    flat = stack.output_shape(in_shape)
    stack = Sequential(*stack, Dense(flat[0], 12, "relu"), Reshape((3, 2, 2)),
                       ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1, activation="relu"),
                       Upsample2d(2), Conv2d(2, 1, 3, padding="same", activation="sigmoid"))
    assert stack.output_shape(in_shape) == (1, 8, 8)
    bind(stack, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, *in_shape))
    y = stack.forward(x).copy()
    dy = rng.standard_normal(y.shape)
    dx = stack.backward(dy).copy()
    shape, twin_layers = in_shape, []
    for layer in stack:
        twin_layers.append((layer, shape))
        shape = layer.output_shape(shape)
    twin = torch.nn.Sequential(*[torch_twin(layer, s) for layer, s in twin_layers])
    tx = torch.tensor(x, requires_grad=True)
    ty = twin(tx)
    (ty * torch.tensor(dy)).sum().backward()
    assert rel_error(y, ty.detach().numpy()) <= 1e-12
    assert rel_error(dx, tx.grad.numpy()) <= 1e-10
    params = [p for p in twin.parameters()]
    ours = [g for layer in stack if layer.param_shapes() for g in (layer.dweight, layer.dbias)]
    assert len(params) == len(ours)
    for p, g in zip(params, ours):
        assert rel_error(g, p.grad.numpy()) <= 1e-10


def test_image_layer_specs_round_trip_and_init_like_torch():
    stack = Sequential(Conv2d(1, 4, 3, stride=(2, 1), padding="same", activation="relu"), MaxPool2d(2, 1, (1, 0)),
                       Upsample2d((2, 3)), ConvTranspose2d(4, 2, (3, 2), 2, (1, 0), (1, 0), "tanh"), Flatten())
    spec = layer_spec(stack)
    again = layer_from_spec(json.loads(json.dumps(spec)))
    assert layer_spec(again) == spec and repr(again) == repr(stack)
    assert again.output_shape((1, 7, 6)) == stack.output_shape((1, 7, 6))
    bind(stack, seed=1)
    conv_layer, convt = stack[0], stack[3]
    for layer, fan_in in ((conv_layer, 1 * 9), (convt, 2 * 6)):  # torch: weight.shape[1] * kH * kW
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(layer.weight).max() <= bound and np.abs(layer.weight).max() > 0.5 * bound
        assert np.abs(layer.bias).max() <= bound


def test_image_layers_name_the_layer_and_shapes_in_errors():
    stack = Sequential(Conv2d(1, 4, 3), Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"Conv2d\(3 -> 4, 3x3\) expects images of shape \(B, 3, H, W\), got \(B, 4, 3, 3\)"):
        stack.output_shape((1, 5, 5))
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, H, W\), got \(B, 784\) \(add a Reshape"):
        Sequential(Conv2d(1, 4, 3)).output_shape((784,))
    with pytest.raises(ValueError, match=r"Conv2d\(1 -> 4, 5x5\) on inputs \(B, 1, 3, 3\): conv2d: kernel 5x5 is larger "
                                         r"than the padded input 3x3"):
        Sequential(Conv2d(1, 4, 5)).output_shape((1, 3, 3))
    with pytest.raises(ValueError, match="MaxPool2d: padding 2 must be at most half the kernel"):
        MaxPool2d(2, padding=2)
    with pytest.raises(ValueError, match="Conv2d: unknown padding 'full'"):
        Conv2d(1, 2, 3, padding="full")
    with pytest.raises(ValueError, match="ConvTranspose2d: output_padding .* must be smaller than the stride"):
        ConvTranspose2d(1, 2, 3, stride=1, output_padding=1)


def test_flatten_and_reshape_on_images():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    flat, back = Flatten(), Reshape((3, 4, 5))
    assert flat.output_shape((3, 4, 5)) == (60,) and back.output_shape((60,)) == (3, 4, 5)
    y = flat.forward(x)
    np.testing.assert_array_equal(y, torch.flatten(torch.tensor(x), 1).numpy())
    np.testing.assert_array_equal(back.forward(y), x)
    np.testing.assert_array_equal(flat.backward(back.backward(x)), x)
