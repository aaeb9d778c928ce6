"""Quality parity: npvae against the same VAE in PyTorch, same data, same batches, same epochs.

Trains the default 784-400-20-400-784 ReLU VAE (Adam 1e-3, batch 128, Bernoulli/BCE likelihood on
grayscale pixels, not binarized) with npvae and, when torch is installed, with PyTorch, for each
seed, and prints each test negative ELBO (nats per image, one-sample estimate) and the means.

    python scripts/parity.py --data-dir ../shared/data/fashion-mnist --dataset fashion-mnist --epochs 10 --seeds 0 1 2

Both models start from the same initial weights (npvae's init, copied into torch) and see the
batches in the same order; only the reparameterization noise differs (each draws its own).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import npvae
from npvae import data
from npvae.data import epoch_permutation


def load(args):
    train_x, _ = data.load_mnist_like(args.dataset, "train", data_dir=args.data_dir)
    test_x, _ = data.load_mnist_like(args.dataset, "test", data_dir=args.data_dir)
    return data.to_float(train_x), data.to_float(test_x)


def train_npvae(train_x, test_x, seed, epochs, batch_size, lr):
    model = npvae.VAE(seed=seed)
    init = model.state_dict()
    opt = npvae.Adam(model.params.data, model.params.grad, lr=lr)
    rng = np.random.default_rng([seed, 1])
    start = time.perf_counter()
    for epoch in range(epochs):
        perm = epoch_permutation(seed, epoch, len(train_x))
        for i in range(0, len(perm), batch_size):
            model.loss_and_grads(train_x[perm[i : i + batch_size]], rng=rng, check=False)
            opt.step()
    seconds = time.perf_counter() - start
    test = model.evaluate(test_x, rng=np.random.default_rng([seed, 2]))
    return test.total, seconds, init


def train_torch(train_x, test_x, seed, epochs, batch_size, lr, init):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    p = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    opt = torch.optim.Adam(p.values(), lr=lr)

    def neg_elbo(x):  # (B, D) -> (B,)
        h = F.relu(F.linear(x, p["encoder.0.weight"], p["encoder.0.bias"]))
        mu = F.linear(h, p["mu.weight"], p["mu.bias"])
        logvar = F.linear(h, p["logvar.weight"], p["logvar.bias"])
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        h = F.relu(F.linear(z, p["decoder.0.weight"], p["decoder.0.bias"]))
        logits = F.linear(h, p["decoder.1.weight"], p["decoder.1.bias"])
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return recon + kl

    xt = torch.from_numpy(train_x)
    start = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.from_numpy(epoch_permutation(seed, epoch, len(train_x)))
        for i in range(0, len(perm), batch_size):
            loss = neg_elbo(xt[perm[i : i + batch_size]]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        test = float(torch.cat([neg_elbo(b) for b in torch.from_numpy(test_x).split(1000)]).mean())
    return test, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist", choices=("mnist", "fashion-mnist"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(torch.get_num_threads())
    except ImportError:
        torch = None
        print("torch is not installed: npvae only")
    train_x, test_x = load(args)
    print(f"{args.dataset}: {len(train_x):,} train / {len(test_x):,} test, {args.epochs} epochs, "
          f"backend {npvae.get_backend()}")
    rows = []
    for seed in args.seeds:
        ours, ours_s, init = train_npvae(train_x, test_x, seed, args.epochs, args.batch_size, args.lr)
        row = {"seed": seed, "npvae": ours, "npvae_seconds": ours_s}
        if torch is not None:
            theirs, theirs_s = train_torch(train_x, test_x, seed, args.epochs, args.batch_size, args.lr, init)
            row.update(torch=theirs, torch_seconds=theirs_s)
        rows.append(row)
        print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    mean_ours = float(np.mean([r["npvae"] for r in rows]))
    summary = {"dataset": args.dataset, "epochs": args.epochs, "seeds": args.seeds, "rows": rows,
               "npvae_mean": mean_ours}
    print(f"\ntest negative ELBO, mean over seeds {args.seeds}: npvae {mean_ours:.2f} nats/image")
    if torch is not None:
        mean_torch = float(np.mean([r["torch"] for r in rows]))
        summary.update(torch_mean=mean_torch, difference=mean_ours - mean_torch)
        print(f"                                        PyTorch {mean_torch:.2f} nats/image")
        print(f"difference npvae - PyTorch: {mean_ours - mean_torch:+.2f} nats (target: within 1)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
