"""Quality parity: npvae against the same VAE in PyTorch, same data, same batches, same epochs.

Trains the default 784-400-20-400-784 ReLU VAE (Adam 1e-3, batch 128, Bernoulli/BCE likelihood on
grayscale pixels, not binarized) with npvae and, when torch is installed, with PyTorch, for each
seed, and prints each test negative ELBO (nats per image, one-sample estimate) and the means.

    python scripts/parity.py --data-dir ../shared/data/fashion-mnist --dataset fashion-mnist --epochs 10 --seeds 0 1 2

Both models start from the same initial weights (npvae's init, copied into torch) and see the
batches in the same order; only the reparameterization noise differs (each draws its own).

``--model conv-vae`` runs the Keras write-up's convolutional VAE instead (npvae's ``ConvVAE``; the
torch side written here with F.conv2d and Keras' "same" padding as explicit pads), as the issue
sizes it for a 2-core machine: latent 20, KL weight 1, the first 10,000 training images, 5 epochs::

    python scripts/parity.py --model conv-vae --limit 10000 --latent-dim 20 --epochs 5 --seeds 0 1 2 \
        --data-dir ../shared/data/fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import npvae
from npvae import data
from npvae.data import epoch_permutation


def load(args):
    train_x, _ = data.load_mnist_like(args.dataset, "train", data_dir=args.data_dir)
    test_x, _ = data.load_mnist_like(args.dataset, "test", data_dir=args.data_dir)
    return data.to_float(train_x), data.to_float(test_x)


def make_model(args, seed):
    if args.model == "conv-vae":
        return npvae.ConvVAE(latent_dim=args.latent_dim, seed=seed)
    return npvae.VAE(seed=seed)


def train_npvae(train_x, test_x, seed, epochs, batch_size, lr, model):
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


def train_torch(train_x, test_x, seed, epochs, batch_size, lr, init, conv=False):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    p = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    opt = torch.optim.Adam(p.values(), lr=lr)

    def conv_logits_and_heads(x):  # the Keras write-up's conv VAE on 28x28 images
        def conv(h, name, stride=1, pads=(1, 1, 1, 1)):  # Keras "same": 3x3 stride 1 pads 1; stride 2 pads (0, 1)
            return F.conv2d(F.pad(h, pads), p[f"{name}.weight"], p[f"{name}.bias"], stride=stride)

        h = F.relu(conv(x.view(-1, 1, 28, 28), "encoder.1"))
        h = F.relu(conv(h, "encoder.2", 2, (0, 1, 0, 1)))
        h = F.relu(conv(F.relu(conv(h, "encoder.3")), "encoder.4"))
        h = F.relu(F.linear(h.flatten(1), p["encoder.6.weight"], p["encoder.6.bias"]))
        mu = F.linear(h, p["mu.weight"], p["mu.bias"])
        logvar = F.linear(h, p["logvar.weight"], p["logvar.bias"])
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        d = F.relu(F.linear(z, p["decoder.0.weight"], p["decoder.0.bias"])).view(-1, 64, 14, 14)
        d = F.conv_transpose2d(d, p["decoder.2.weight"], p["decoder.2.bias"], stride=2)[:, :, :28, :28]  # "same"
        return conv(F.relu(d), "decoder.3").flatten(1), mu, logvar

    def mlp_logits_and_heads(x):
        h = F.relu(F.linear(x, p["encoder.0.weight"], p["encoder.0.bias"]))
        mu = F.linear(h, p["mu.weight"], p["mu.bias"])
        logvar = F.linear(h, p["logvar.weight"], p["logvar.bias"])
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        h = F.relu(F.linear(z, p["decoder.0.weight"], p["decoder.0.bias"]))
        return F.linear(h, p["decoder.1.weight"], p["decoder.1.bias"]), mu, logvar

    def neg_elbo(x):  # (B, D) -> (B,)
        logits, mu, logvar = (conv_logits_and_heads if conv else mlp_logits_and_heads)(x)
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
    from npvae.cli.parser import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="vae", choices=("vae", "conv-vae"),
                        help="vae: the 784-400-20 MLP VAE; conv-vae: the conv VAE")
    parser.add_argument("--latent-dim", type=int, default=20, help="conv-vae's latent size (the MLP VAE's is 20)")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    parser.add_argument("--dataset", default="fashion-mnist", choices=("mnist", "fashion-mnist"),
                        help="the data both frameworks train on")
    parser.add_argument("--data-dir", default=None, help="folder holding the dataset's IDX files (default: "
                        "npvae's usual places: $NPVAE_DATA_DIR, the cache, then download)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one paired run per seed")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(torch.get_num_threads())
    except ImportError:
        torch = None
        print("torch is not installed: npvae only")
    try:
        train_x, test_x = load(args)
    except (FileNotFoundError, data.DownloadError) as exc:  # the data's own one-line hint, no traceback
        sys.exit(f"parity.py: {exc}")
    train_x = train_x[: args.limit]
    print(f"{args.dataset}, {args.model}: {len(train_x):,} train / {len(test_x):,} test, {args.epochs} epochs, "
          f"backend {npvae.get_backend()}")
    rows = []
    for seed in args.seeds:
        ours, ours_s, init = train_npvae(train_x, test_x, seed, args.epochs, args.batch_size, args.lr,
                                         make_model(args, seed))
        row = {"seed": seed, "npvae": ours, "npvae_seconds": ours_s}
        if torch is not None:
            theirs, theirs_s = train_torch(train_x, test_x, seed, args.epochs, args.batch_size, args.lr, init,
                                           conv=args.model == "conv-vae")
            row.update(torch=theirs, torch_seconds=theirs_s)
        rows.append(row)
        print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    mean_ours = float(np.mean([r["npvae"] for r in rows]))
    summary = {"dataset": args.dataset, "model": args.model, "n_train": len(train_x), "epochs": args.epochs, "seeds": args.seeds, "rows": rows,
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
