"""Plain vs sparse vs contractive autoencoder on the same data, architecture, epochs and seed.

Trains three runs with the ``npvae`` command line, the one-layer 784 -> 196 sigmoid autoencoder of the
``sparse-ae`` / ``contractive-ae`` presets:

- plain:       ``npvae train --model sparse-ae --sparsity-weight 0`` (the same network, no penalty)
- sparse:      ``npvae train --model sparse-ae`` (KL penalty, rho = 0.05, beta = 3)
- contractive: ``npvae train --model contractive-ae`` (lambda = 0.1)

then ``npvae evaluate --json`` each on the test split and prints a markdown table (reconstruction
error, the penalty term, mean code activation, share of activations with |h| <= 0.05, mean
||d code / d x||_F), and draws each run's first-layer filters and code histogram into ``--pictures``.

Usage: python scripts/compare_autoencoders.py [--dataset demo] [--epochs 20] [--out runs/compare]
       [--pictures docs/autoencoders] [--extra ARGS...]   (1.5 CPU-minutes with the defaults)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npvae.cli import main  # noqa: E402

RUNS = {  # name -> (model, extra flags)
    "plain": ("sparse-ae", ["--sparsity-weight", "0"]),
    "sparse": ("sparse-ae", []),
    "contractive": ("contractive-ae", []),
}


def run(argv: list[str]) -> str:
    """``npvae ARGV``, echoed; its stdout."""
    print("$ npvae " + shlex.join(argv), file=sys.stderr)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(argv)
    if status != 0:
        raise SystemExit(f"npvae {argv[0]} failed with status {status}:\n{buffer.getvalue()}")
    return buffer.getvalue()


def main_script() -> None:
    from npvae.cli.parser import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="demo", choices=("demo", "mnist", "fashion-mnist"),
                        help="the data every model trains on")
    parser.add_argument("--data-dir", default=None, help="folder holding the dataset's IDX files (default: "
                        "npvae's usual places: $NPVAE_DATA_DIR, the cache, then download)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per model")
    parser.add_argument("--seed", type=int, default=0, help="seeds every run")
    parser.add_argument("--out", default="runs/compare", help="folder of the runs (one subfolder per model)")
    parser.add_argument("--pictures", default="runs/compare/pictures",
                        help="folder for the comparison's pictures (docs/autoencoders for the committed ones)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more flags for every npvae train (e.g. --latent-dim 100)")
    args = parser.parse_args()
    data = ["--dataset", args.dataset] + (["--data-dir", args.data_dir] if args.data_dir else [])
    pictures = Path(args.pictures)
    rows = []
    for name, (model, flags) in RUNS.items():
        out = Path(args.out) / name
        run(["train", "--model", model, *flags, *data, "--epochs", str(args.epochs), "--patience", "0",
             "--seed", str(args.seed), "--no-progress", "--no-pictures", "--out", str(out), *args.extra])
        ckpt = str(out / "checkpoint.npz")
        result = json.loads(run(["evaluate", ckpt, *data, "--json"]).strip().splitlines()[-1])
        run(["plot", ckpt, "filters", "--n", "100", "--out", str(pictures / f"filters_{name}.png"), *data])
        run(["plot", ckpt, "code-histogram", "--out", str(pictures / f"codes_{name}.png"), *data])
        rows.append((name, " ".join([f"--model {model}", *flags]), result))
    split = rows[0][2]["split"]
    print(f"\n{args.dataset}, {args.epochs} epochs, seed {args.seed}; {split} split, {rows[0][2]['examples']} images\n")
    print("| run | flags | recon (squared error / image) | penalty term (unweighted) | mean activation | "
          "activations <= 0.05 | mean ‖∂h/∂x‖_F |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, flags, r in rows:
        print(f"| {name} | `{flags}` | {r['recon']:.2f} | {r['reg']:.3f} | {r['code_mean_activation']:.3f} | "
              f"{100 * r['code_near_zero']:.1f}% | {r['mean_jacobian_frobenius']:.3f} |")


if __name__ == "__main__":
    main_script()
