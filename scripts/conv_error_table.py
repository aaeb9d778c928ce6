"""Worst relative error of every image op (npvae.conv) and each of its gradients against torch.nn.functional.

Random float64 cases: batch 1-4, channels 1-4, images 1-12 pixels a side, kernels 1-5, strides 1-3,
every padding form (int, pair, "valid", Keras "same"; output_padding for the transposed convolution;
ties included for max pooling, half the cases), in both kernel backends. The metric is the tests':
max|a - b| / max(|a| + |b|) over the whole array (``tests.helpers.rel_error``). Prints a markdown table.

Usage: PYTHONPATH=. python scripts/conv_error_table.py [--cases 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npvae import conv  # noqa: E402
from npvae.backend import numba_available, use_backend  # noqa: E402
from tests.helpers import rel_error, torch_conv2d, torch_conv_transpose2d, torch_max_pool2d  # noqa: E402

torch.set_num_threads(1)


def _padding(rng, allow_strings=True):
    kind = rng.integers(4 if allow_strings else 2)
    if kind == 0:
        return int(rng.integers(3))
    if kind == 1:
        return (int(rng.integers(3)), int(rng.integers(3)))
    return ("valid", "same")[kind - 2]


def _case(rng, op):
    """A random valid case for op, drawn until its sizes fit."""
    while True:
        shape = (int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(1, 13)), int(rng.integers(1, 13)))
        kernel = (int(rng.integers(1, 6)), int(rng.integers(1, 6)))
        stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        case = {"shape": shape, "kernel": kernel, "stride": stride, "c_out": int(rng.integers(1, 5))}
        try:
            if op == "conv2d":
                case["padding"] = _padding(rng)
                conv.conv2d_output_shape(shape[1:], case["c_out"], kernel, stride, case["padding"])
            elif op == "conv_transpose2d":
                case["padding"] = _padding(rng)
                case["output_padding"] = (0 if isinstance(case["padding"], str) else
                                          (int(rng.integers(stride[0])), int(rng.integers(stride[1]))))
                conv.conv_transpose2d_output_shape(shape[1:], case["c_out"], kernel, stride, case["padding"],
                                                   case["output_padding"])
            elif op == "max_pool2d":
                case["padding"] = (("valid", "same")[rng.integers(2)] if rng.random() < 0.5 else
                                   (int(rng.integers(kernel[0] // 2 + 1)), int(rng.integers(kernel[1] // 2 + 1))))
                conv.max_pool2d_output_shape(shape[1:], kernel, stride, case["padding"])
            return case
        except ValueError:
            continue


def errors(op, case, rng):
    """{output name: relative error} for one case."""
    t = lambda a: torch.tensor(a, requires_grad=True)  # noqa: E731
    b, c, h, w = case["shape"]
    if op in ("conv2d", "conv_transpose2d"):
        wshape = (c, case["c_out"], *case["kernel"]) if op == "conv_transpose2d" else (case["c_out"], c, *case["kernel"])
        x, wt, bias = rng.standard_normal(case["shape"]), rng.standard_normal(wshape), rng.standard_normal(case["c_out"])
        if op == "conv2d":
            y, cache = conv.conv2d_forward(x, wt, bias, case["stride"], case["padding"])
            dy = rng.standard_normal(y.shape)
            ours = (y, *conv.conv2d_backward(dy, cache))
            ref = torch_conv2d
        else:
            y, cache = conv.conv_transpose2d_forward(x, wt, bias, case["stride"], case["padding"], case["output_padding"])
            dy = rng.standard_normal(y.shape)
            ours = (y, *conv.conv_transpose2d_backward(dy, cache))
            ref = torch_conv_transpose2d
        tx, tw, tb = t(x), t(wt), t(bias)
        ty = ref(tx, tw, tb, case)
        ty.backward(torch.tensor(dy))
        return {name: rel_error(a, r.detach().numpy())
                for name, a, r in zip(("forward", "dx", "dw", "db"), ours, (ty, tx.grad, tw.grad, tb.grad))}
    x = rng.integers(0, 3, case["shape"]).astype(float) if rng.random() < 0.5 else rng.standard_normal(case["shape"])
    tx = t(x)
    if op == "max_pool2d":
        y, cache = conv.max_pool2d_forward(x, case["kernel"], case["stride"], case["padding"])
        dy = rng.standard_normal(y.shape)
        dx = conv.max_pool2d_backward(dy, cache)
        ty = torch_max_pool2d(tx, case)
    else:
        y, cache = conv.upsample_nearest2d_forward(x, case["stride"])
        dy = rng.standard_normal(y.shape)
        dx = conv.upsample_nearest2d_backward(dy, cache)
        ty = torch.nn.functional.interpolate(tx, scale_factor=case["stride"], mode="nearest")
    ty.backward(torch.tensor(dy))
    return {"forward": rel_error(y, ty.detach().numpy()), "dx": rel_error(dx, tx.grad.numpy())}


def main() -> None:
    from npvae.cli.parser import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--cases", type=int, default=300, help="random cases per op and backend")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random cases")
    args = parser.parse_args()
    backends = ["numpy"] + (["numba"] if numba_available() else [])
    print("| op | backend | forward | dx | dw | db |")
    print("|---|---|---:|---:|---:|---:|")
    for op in ("conv2d", "conv_transpose2d", "max_pool2d", "upsample_nearest2d"):
        for backend in backends:
            rng = np.random.default_rng(args.seed)  # the same cases in both backends
            worst = {}
            with use_backend(backend):
                for _ in range(args.cases):
                    for name, err in errors(op, _case(rng, op), rng).items():
                        worst[name] = max(worst.get(name, 0.0), err)
            cells = [f"{worst[k]:.1e}" if k in worst else "-" for k in ("forward", "dx", "dw", "db")]
            print(f"| {op} | {backend} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{args.cases} random float64 cases per op and backend, seed {args.seed}.")


if __name__ == "__main__":
    main()
