"""The Keras conv VAE under PyTorch's and Keras' RMSprop: the first steps of each, on 64 Fashion-MNIST images.

The Keras write-up compiles its conv VAE (latent 2, batch 16, KL weight 5e-4 per pixel mean = 0.392 on
npvae's per-image sums) with ``optimizer='rmsprop'``: Keras' RMSprop, rho 0.9, epsilon 1e-7 added
*inside* the square root, lr 1e-3. PyTorch's RMSprop (alpha 0.99, eps 1e-8 added outside the root)
starts with a step of lr / sqrt(1 - alpha) = 10 lr on every weight whose gradient is not tiny, and
this network does not survive it. The middle run (torch's rule with Keras' decay 0.9, a first step
of 3.2 lr) shows which difference decides it here: the decay; epsilon's place only changes the steps
of weights whose gradients are below about sqrt(1e-7 / (1 - rho)) = 1e-3.

    PYTHONPATH=. python scripts/optimizer_conventions.py --data-dir ../shared/data/fashion-mnist [--steps 8]

prints, for each optimizer from the same initialisation, batches and noise, the training loss (batch
mean of per-image nats) before each of the first steps, then its mean over each pass of the images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from npvae import data
from npvae.models.convnets import ConvVAE
from npvae.optim import OPTIMIZERS

KL_WEIGHT = 784 * 5e-4  # the write-up's -5e-4 * mean_j(...) beside a per-pixel-mean BCE, on per-image sums


# (optimizer, settings): torch's defaults, torch's rule with Keras' decay (is it rho or epsilon?), Keras'
RUNS = [("rmsprop", {}), ("rmsprop", {"rho": 0.9}), ("keras-rmsprop", {})]


def losses(name: str, settings: dict, x: np.ndarray, steps: int, batch_size: int = 16, lr: float = 1e-3,
           seed: int = 0) -> list[float]:
    """The batch-mean loss before each of ``steps`` steps of optimizer ``name`` with ``settings``."""
    model = ConvVAE(784, latent_dim=2, beta=KL_WEIGHT, seed=seed)
    entry = OPTIMIZERS[name]
    opt = entry.build(model.params.data, model.params.grad, lr, entry.options_from(settings))
    rng = np.random.default_rng([seed, 1])
    out = []
    for step in range(steps):
        start = (step * batch_size) % len(x)
        terms, _ = model.loss_and_grads(x[start:start + batch_size], rng=rng)
        out.append(float(np.mean(terms.total)))
        if not np.isfinite(out[-1]):
            break
        opt.step()
    return out


def main(argv=None) -> None:
    from npvae.cli.parser import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps in all (default 40: 10 passes of 64 images)")
    parser.add_argument("--images", type=int, default=64, help="training images (the first of Fashion-MNIST)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where Fashion-MNIST's IDX files are")
    args = parser.parse_args(argv)
    images, _ = data.load_mnist_like("fashion-mnist", "train", data_dir=args.data_dir, download=False)
    images = images[: args.images]
    x = (images.reshape(len(images), 784) / np.float32(255)).astype(np.float32)
    print(f"conv-vae, latent 2, KL weight {KL_WEIGHT:g}, batch 16, lr 1e-3, {len(x)} Fashion-MNIST images")
    for name, settings in RUNS:
        trace = losses(name, settings, x, args.steps)
        print(f"{name} ({OPTIMIZERS[name].options_from(settings)}):")
        print("    loss before step " + ", ".join(f"{i + 1}: {v:.4g}" for i, v in enumerate(trace[:8])))
        per_pass = len(x) // 16
        means = [np.mean(trace[i:i + per_pass]) for i in range(0, len(trace) - per_pass + 1, per_pass)]
        print(f"    mean loss per pass of {len(x)} images: " + ", ".join(f"{v:.4g}" for v in means))


if __name__ == "__main__":
    main()
