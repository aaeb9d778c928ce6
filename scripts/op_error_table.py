"""Worst relative error of every op against its float64 PyTorch reference, in both backends.

For each op (and reduction / activation) in the test suite's op table (``tests/helpers.py``), draw
random float64 cases, extremes included (logits to +-100, logvar to +-30, whole arrays saturated or
near 0), run ours and the reference with a random upstream gradient, and print a markdown table of
the worst forward and worst gradient error (CS231n: max|a - b| / max(|a| + |b|) over the array).

The metric is the tests' own: the continuous-Bernoulli NLL's forward is judged against the size of
its terms, and sigmoid/tanh gradients against |dout| where they saturate (see ``OpSpec``);
``--raw`` drops those floors.

Usage: python scripts/op_error_table.py [--cases 200] [--seed 0] [--raw]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npvae.backend import numba_available, use_backend  # noqa: E402
from tests.helpers import OP_SPECS, RANGES, RandomSource, torch_errors  # noqa: E402


def worst_errors(spec, backend: str, cases: int, seed: int, floors: bool) -> tuple[float, float]:
    rng = np.random.default_rng(seed)  # the same cases in both backends
    fwd = grad = 0.0
    with use_backend(backend):
        for _ in range(cases):
            src = RandomSource(rng)
            errors = torch_errors(spec, spec.build(src, RANGES["torch"], 1e-9), src, floors=floors)
            fwd = max(fwd, errors.pop("forward"))
            grad = max([grad, *errors.values()])
    return fwd, grad


def main() -> None:
    from npvae.cli.parser import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--cases", type=int, default=200, help="random cases per op and backend")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random cases")
    parser.add_argument("--raw", action="store_true", help="plain CS231n metric, no cancellation/saturation floors")
    args = parser.parse_args()

    backends = ["numpy"] + (["numba"] if numba_available() else [])
    header = "| op | " + " | ".join(f"{b} forward | {b} gradient" for b in backends) + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * len(backends)))
    for name, spec in OP_SPECS.items():
        cells = []
        for backend in backends:
            fwd, grad = worst_errors(spec, backend, args.cases, args.seed, not args.raw)
            cells += [f"{fwd:.1e}", f"{grad:.1e}" if spec.wrt else "-"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{args.cases} cases per op and backend, seed {args.seed}, shapes up to 64 x 64, float64.")


if __name__ == "__main__":
    main()
