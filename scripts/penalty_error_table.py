"""Worst relative errors of the sparsity and contractive penalties against PyTorch, in float64.

Random cases like the tests' (tests/test_penalties.py, tests/models/test_regularized.py), more of them:

- the contractive penalty of dense stacks of depth 1-4, widths 1-8, every activation per layer, weights
  scaled by 0.3, 1 or 3, against torch's double backward (the Jacobian by autograd with
  ``create_graph=True``, its squared norm differentiated again): the penalty, dL/dx, every dW and db;
- the L1 and KL sparsity penalties;
- whole models (sparse-ae kl and l1, contractive-ae of depth 1-3) against the torch references:
  loss and every parameter's gradient through ``loss_and_grads``.

The metric is the tests' (CS231n ``max|a - b| / max(|a| + |b|)`` over an array; the gradients of a
stack floored at 1e-12 x the largest gradient, the models' at the floors of ``gradient_errors``).

Usage: python scripts/penalty_error_table.py [--cases 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from npvae import ops, penalties  # noqa: E402
from npvae.models import ContractiveAutoencoder, SparseAutoencoder  # noqa: E402
from tests.helpers import rel_error  # noqa: E402
from tests.models.test_models import data_batch, noise_draws, torch_loss_and_grads  # noqa: E402
from tests.test_penalties import dense_stack, draw_stack, torch_contraction  # noqa: E402
from tests.torch_models import gradient_errors  # noqa: E402
from tests.torch_models import rel_error as scaled_error  # noqa: E402


def contractive_case(rng) -> tuple[float, float]:
    sizes = [int(s) for s in rng.integers(1, 9, size=rng.integers(2, 6))]
    acts = [str(a) for a in rng.choice(list(ops.ACTIVATIONS), size=len(sizes) - 1)]
    alpha = float(rng.choice([0.0, 0.01, 0.3]))
    batch = int(rng.integers(1, 9))
    x, weights, biases = draw_stack(rng, sizes, float(rng.choice([0.3, 1.0, 3.0])), batch)
    rows, cache = penalties.contractive_penalty_forward(dense_stack(x, weights, biases, acts, alpha))
    dloss = rng.standard_normal(batch)
    grads = penalties.contractive_penalty_backward(dloss, cache)
    tx = torch.tensor(x, requires_grad=True)
    tw = [torch.tensor(w, requires_grad=True) for w in weights]
    tb = [torch.tensor(b, requires_grad=True) for b in biases]
    trows = torch_contraction(tx, tw, tb, acts, alpha)
    theirs = torch.autograd.grad((trows * torch.tensor(dloss)).sum(), [tx, *tw, *tb], allow_unused=True)
    theirs = [np.zeros(t.shape) if g is None else g.numpy() for g, t in zip(theirs, [tx, *tw, *tb])]
    ours = [grads[0], *grads[1], *grads[2]]
    floor = 1e-12 * max(float(np.abs(g).max(initial=0)) for g in theirs)
    return rel_error(rows, trows.detach().numpy(), 1e-12), max(rel_error(a, b, floor) for a, b in zip(ours, theirs))


def sparsity_case(rng) -> tuple[float, float]:
    b, h = (int(v) for v in rng.integers(1, 10, size=2))
    code = 1 / (1 + np.exp(-float(rng.choice([1.0, 4.0, 12.0])) * rng.standard_normal((b, h))))
    rho = float(rng.choice([0.01, 0.05, 0.5]))
    t = torch.tensor(code, requires_grad=True)
    kl = (rho * torch.log(rho / t.mean(0)) + (1 - rho) * torch.log((1 - rho) / (1 - t.mean(0)))).sum()
    kl.backward()
    value, cache = penalties.kl_sparsity_forward(code, rho)
    r = code.mean(0)
    floor = float(np.max(rho / r + (1 - rho) / (1 - r))) / b  # torch's form cancels near rho (see the tests)
    fwd, grad = rel_error(value, kl.item(), 1e-12), rel_error(penalties.kl_sparsity_backward(1.0, cache), t.grad.numpy(), floor)
    t = torch.tensor(code - 0.5, requires_grad=True)
    t.abs().sum().backward()
    value, cache = penalties.l1_activity_forward(code - 0.5, "sum")
    return (max(fwd, rel_error(value, np.abs(code - 0.5).sum())),
            max(grad, rel_error(penalties.l1_activity_backward(1.0, cache), t.grad.numpy())))


def model_case(rng, kind: str) -> tuple[float, float]:
    d, z, b = int(rng.integers(1, 11)), int(rng.integers(1, 7)), int(rng.integers(1, 13))
    hidden = tuple(int(s) for s in rng.integers(1, 9, size=rng.integers(0, 3)))
    act = str(rng.choice(list(ops.ACTIVATIONS)))
    seed = int(rng.integers(2**31))
    if kind == "contractive":
        model = ContractiveAutoencoder(d, hidden, z, act, code_activation=str(rng.choice(list(ops.ACTIVATIONS))),
                                       contraction_weight=float(rng.choice([0.1, 1.0, 10.0])), dtype=np.float64,
                                       seed=seed)
    elif kind == "sparse-l1":
        model = SparseAutoencoder(d, hidden, z, act, code_activation=str(rng.choice(list(ops.ACTIVATIONS))),
                                  sparsity_penalty="l1", sparsity_weight=0.5, dtype=np.float64, seed=seed)
    else:
        model = SparseAutoencoder(d, hidden, z, act, sparsity_weight=3.0, dtype=np.float64, seed=seed)
    model.params.data *= float(rng.choice([0.5, 1.0, 3.0]))
    x = model.check_input(data_batch(model, b, rng))
    x_in, eps = noise_draws(model, x, 0)
    (total, _, _), expected = torch_loss_and_grads(model, x, x_in, eps)
    terms, grads = model.loss_and_grads(x)
    return scaled_error(terms.total, total, floor=1.0), max(gradient_errors(grads, expected).values())


def main() -> None:
    from npvae.cli.parser import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--cases", type=int, default=300, help="random cases per penalty and backend")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random cases")
    args = parser.parse_args()
    torch.set_num_threads(1)
    checks = {"contractive penalty (depth 1-4) vs double backward": contractive_case,
              "L1 and KL sparsity penalties": sparsity_case,
              "contractive-ae model": lambda rng: model_case(rng, "contractive"),
              "sparse-ae model (kl)": lambda rng: model_case(rng, "sparse-kl"),
              "sparse-ae model (l1)": lambda rng: model_case(rng, "sparse-l1")}
    print(f"{args.cases} random float64 cases each, seed {args.seed}\n")
    print("| check | worst loss error | worst gradient error |")
    print("|---|---:|---:|")
    for name, case in checks.items():
        rng = np.random.default_rng(args.seed)
        worst = np.max([case(rng) for _ in range(args.cases)], axis=0)
        print(f"| {name} | {worst[0]:.1e} | {worst[1]:.1e} |")


if __name__ == "__main__":
    main()
