"""Where a training step of the conv VAE goes: per layer (forward, backward), the copies and passes
around the products, Adam, and the same step in PyTorch eager for reference.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/conv_profile.py

The network and step are ``scripts/bench.py --model conv-vae``'s (latent 20, batch 128, float32,
Adam), on random images in [0, 1] (timing does not depend on the values). Times are CPU seconds of
the calling thread (``time.thread_time``), so other processes on a shared machine slow the numbers
less than they slow wall time (caches and memory bandwidth are still shared); each figure is a
median over the measured steps. The pieces are timed by wrapping npvae's functions:

- im2col: the window copies into the column matrix (:func:`npvae.conv._im2col`);
- padding: the zero-padded copies of inputs and upstream gradients (:func:`npvae.conv._pad_dilate`);
- col2im: the scatter of a strided transposed convolution's per-pixel contributions;
- bias + activation (forward, one fused pass) and the activation's derivative (backward);
- bias gradients (sums over batch and pixels);
- direct loops: the 32 -> 1 output convolution's forward and weight gradient.

A layer's products (BLAS) are its time minus the pieces inside it. ``tracemalloc`` reports what a
steady-state step allocates. The comparison with PyTorch's step uses process CPU time (all threads)
on both sides, so work a framework hands to a thread of its own is counted.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import npvae  # noqa: E402
from npvae import _kernels as K  # noqa: E402
from npvae import conv, layers, optim  # noqa: E402

PIECES = {  # (module, attribute) -> label
    (conv, "_im2col"): "im2col copies",
    (conv, "_pad_dilate"): "padding copies",
    (K, "col2im"): "col2im scatter",
    (K, "channel_bias_act"): "bias + activation",
    (K, "act_backward"): "activation derivative",
    (conv, "_bias_grad"): "bias gradients",
    (K, "conv_direct_forward"): "direct loops (32 -> 1)",
    (K, "conv_direct_weight_grad"): "direct loops (32 -> 1)",
}


class Clock:
    """Thread CPU time per label, step by step; a piece's time is also filed under the layer running it."""

    def __init__(self):
        self.step: dict[str, float] = collections.defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.layer = None  # "name|pass" of the layer call in progress
        self.in_piece = False

    def wrap(self, fn, label: str, piece: bool = False, layer: str | None = None):
        clock = self

        def timed(*args, **kwargs):
            if piece and clock.in_piece:  # a piece inside a piece counts once
                return fn(*args, **kwargs)
            outer_layer = clock.layer
            if layer is not None:
                clock.layer = layer
            clock.in_piece |= piece
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.thread_time() - start
                clock.step[label] += spent
                if piece:
                    clock.in_piece = False
                    if clock.layer is not None:
                        clock.step[f"piece|{clock.layer}|{label}"] += spent
                clock.layer = outer_layer

        return timed

    def end_step(self):
        self.steps.append(dict(self.step))
        self.step.clear()

    def median(self, label: str) -> float:
        return statistics.median(s.get(label, 0.0) for s in self.steps)


def instrument(model, clock: Clock):
    for (module, name), label in PIECES.items():
        setattr(module, name, clock.wrap(getattr(module, name), label, piece=True))
    for part_name, part in model.parts.items():
        leaves = part.layers if isinstance(part, layers.Sequential) else [part]
        for i, layer in enumerate(leaves):
            if isinstance(layer, (layers.Reshape, layers.Flatten)):
                continue
            name = f"{part_name}.{i} {layer!r}" if isinstance(part, layers.Sequential) else f"{part_name} {layer!r}"
            for which in ("forward", "backward"):
                tag = f"{name}|{which}"
                setattr(layer, which, clock.wrap(getattr(layer, which), f"layer|{tag}", layer=tag))


def torch_step_seconds(batch: int, latent: int, steps: int) -> float | None:
    """Median process CPU seconds of bench.py's PyTorch conv VAE step (Adam included): every thread of
    the process, so work torch hands to its own threads is counted."""
    try:
        import torch
    except ImportError:
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("npvae_bench", Path(__file__).with_name("bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (batch, 784), dtype=np.uint8)}
    peer = bench.ConvTorchPeer(arrays, {"seed": 0, "batch_size": batch, "hidden": 400, "latent": latent,
                                         "limit": None, "lr": 1e-3})
    x = peer.x
    times = []
    for i in range(steps + 3):
        start = time.process_time()
        loss = peer.model(x, torch.randn(batch, latent, generator=peer.gen))
        peer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        peer.optimizer.step()
        if i >= 3:
            times.append(time.process_time() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    from npvae.cli.parser import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--batch-size", type=int, default=128, help="images per profiled step")
    p.add_argument("--latent-dim", type=int, default=20, help="the conv VAE's latent size")
    p.add_argument("--steps", type=int, default=20, help="measured steps (after 3 warm-up steps)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference step")
    args = p.parse_args(argv)
    b, z = args.batch_size, args.latent_dim

    model = npvae.ConvVAE(latent_dim=z, seed=0)
    opt = optim.Adam(model.params.data, model.params.grad, 1e-3)
    rng = np.random.default_rng(0)
    x = rng.random((b, 784), dtype=np.float32)
    clock = Clock()
    instrument(model, clock)
    step_adam = clock.wrap(opt.step, "adam")

    def step():
        start, process_start = time.thread_time(), time.process_time()
        model.loss_and_grads(x, rng=rng, check=False)
        step_adam()
        clock.step["step"] = time.thread_time() - start
        clock.step["process"] = time.process_time() - process_start

    for _ in range(3):
        step()
        clock.step.clear()
    for _ in range(args.steps):
        step()
        clock.end_step()
    tracemalloc.start()
    step()
    clock.step.clear()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    total = clock.median("step")
    print(f"npvae ConvVAE (latent {z}), batch {b}, float32, backend {npvae.get_backend()}: "
          f"{total * 1e3:.1f} ms per step (thread CPU time, median of {args.steps} steps)\n")
    print("| layer | pass | ms | share | products (BLAS) | copies and passes (ms) |")
    print("|---|---|---:|---:|---:|---|")
    labels = sorted({k for s in clock.steps for k in s})
    piece_labels = sorted(set(PIECES.values()))
    rows = []
    for label in labels:
        if label.startswith("layer|"):
            _, name, which = label.split("|")
            pieces = {k: clock.median(f"piece|{name}|{which}|{k}") for k in piece_labels}
            rows.append((clock.median(label), name, which, pieces))
    for t, name, which, pieces in sorted(rows, reverse=True):
        detail = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(pieces.items(), key=lambda kv: -kv[1]) if v >= 5e-5)
        print(f"| {name} | {which} | {t * 1e3:.1f} | {t / total:.0%} | {(t - sum(pieces.values())) * 1e3:.1f} | "
              f"{detail or '–'} |")
    adam = clock.median("adam")
    rest = total - sum(r[0] for r in rows) - adam
    print(f"| Adam (one fused loop over {model.params.size:,} parameters) | | {adam * 1e3:.1f} | {adam / total:.0%} | | |")
    print(f"| loss, sampler, KL, Python | | {rest * 1e3:.1f} | {rest / total:.0%} | | |")
    print("\nSummed over the step:")
    pieces_total = {k: clock.median(k) for k in piece_labels}
    products = total - adam - rest - sum(pieces_total.values())
    print(f"- products (BLAS, inside the layers): {products * 1e3:.1f} ms ({products / total:.0%})")
    for k, v in pieces_total.items():
        print(f"- {k}: {v * 1e3:.1f} ms ({v / total:.0%})")
    print(f"- Adam: {adam * 1e3:.1f} ms; loss, sampler, KL, Python: {rest * 1e3:.1f} ms")
    print(f"- allocated by a steady-state step (tracemalloc peak): {peak / 1e3:.1f} kB")
    if not args.no_torch:
        t = torch_step_seconds(b, z, args.steps)
        if t is None:
            print("\nPyTorch is not installed: no reference step.")
        else:
            ours = clock.median("process")
            print(f"\nProcess CPU time per step (all threads), median of {args.steps}: npvae {ours * 1e3:.1f} ms, "
                  f"PyTorch eager (the same network and step, scripts/bench.py's peer) {t * 1e3:.1f} ms; "
                  f"npvae / PyTorch = {ours / t:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
