"""Speed benchmark: npvae against PyTorch (eager) and JAX (jit), and against the machine's own limit.

Trains the default 784-400-20-400-784 ReLU VAE (float32, batch 128, Adam 1e-3, Bernoulli decoder:
BCE on logits summed over pixels, mean over the batch, analytic KL) on Fashion-MNIST's 60,000
training images with npvae and, where installed, PyTorch and JAX, and prints a markdown table:

    PYTHONPATH=. python scripts/bench.py --data-dir ../shared/data/fashion-mnist --epochs 5
    PYTHONPATH=. python scripts/bench.py --data-dir ../shared/data/fashion-mnist --sweep
    PYTHONPATH=. python scripts/bench.py --dataset demo --limit 2000 --epochs 2     # a quick look

How it measures, and why:

- **One process per peer, epochs alternating.** npvae (Numba backend), npvae (NumPy backend),
  PyTorch, JAX and the bare-matmul limit each run in their own worker subprocess; this script only
  tells them, in turn, to train one epoch: epoch 1 npvae, epoch 1 torch, epoch 1 jax, ..., epoch 2
  npvae, ... so machine noise (other users of the 2 cores) hits every peer alike, and the noise is
  measured: for each epoch, the CPU time every other process on the machine used meanwhile, in cores
  (from ``/proc/stat``), reported per peer as "others' load". Separate
  processes also keep the thread pools apart (torch's OpenMP runtime, XLA's pool, Numba's and
  OpenBLAS's) so no peer runs with another's threads loaded into it, and give each peer an honest
  peak memory: the worker's own ``ru_maxrss``.
- **Same data, same batches, same start.** Every peer visits the images in the order
  ``npvae.data.epoch_permutation(seed, epoch, n)`` and starts from npvae's initial weights (the
  mu and logvar heads fused into one 400->40 layer everywhere). Only the reparameterization noise
  differs: each framework draws its own.
- **npvae through its real training path.** The worker builds a :class:`npvae.train.Trainer`
  (pictures off, patience None) and, for each epoch, raises ``config.epochs`` by one and calls
  ``run(resume=True)``: the loop, the per-epoch RNG reset, the checkpoint and the log are the ones
  users get, and the time is the record's ``seconds`` (training steps only; evaluation and
  checkpointing happen outside it). Driving ``trainer._run_epoch()`` instead would skip ``run``'s
  per-epoch bookkeeping and lean on a private method. The Trainer's validation split is the first
  1,000 test images, so its per-epoch evaluation is cheap and all 60,000 training images are
  trained on; nothing is selected on it (patience None), so this leaks nothing into the results.
- **Seconds per epoch** is the median over the epochs after the first; **first-epoch overhead** is
  the first epoch minus that median (Numba compiling or loading its cached kernels, JAX tracing and
  compiling both batch shapes, first-touch allocations).
- **Test negative ELBO** uses one estimator for every peer: the trained weights go through one
  float64 NumPy function (:func:`neg_elbo_reference`) with the same standard-normal draws, a
  one-sample estimate in nats per image over the 10,000 test images.
- **The limit.** The ``matmul`` worker runs exactly the matrix products of one epoch through
  NumPy's BLAS and nothing else: per step of batch B, forward ``x @ W.T`` for the four layers
  (784->400, 400->40, 20->400, 400->784), backward ``dW = dy.T @ x`` for all four and
  ``dx = dy @ W`` for the three layers that need one, all with ``out=`` buffers, on fixed random
  operands. It is the floor for any trainer of this model that multiplies through NumPy's BLAS, as
  npvae does (torch and XLA bring their own GEMM kernels and are not bound by it); npvae's distance
  from it is everything else it does (activations, loss, sampling, Adam, Python).
- **Threads** are left at their defaults and reported: OpenBLAS's (read from the library itself),
  Numba's threading layer and thread count, torch's intra- and inter-op threads, JAX's devices.

``--sweep`` times npvae alone (Numba backend) while the batch size, hidden width, latent size and
number of training images vary one at a time from the default (20,000 images, or ``--limit``), and
splits each epoch into the bare matmul time of that configuration and the rest. It runs in rounds:
each round sets every configuration up afresh and trains one epoch of it and one of its bare
matmuls, so the machine's drift over minutes (~20% here) touches every row alike instead of
whichever rows ran last; a row reports its fastest round, since noise only ever adds time.

``--model conv-vae`` benchmarks the Keras write-up's convolutional VAE instead (latent 20, Bernoulli
decoder, npvae's ``ConvVAE``; 10,000 training images per epoch unless ``--limit`` says otherwise):
npvae (both backends) against the same network in PyTorch eager and in JAX (the whole step jitted),
all started from npvae's initial weights, with Keras' "same" padding written as explicit pads and
crops; the ``matmul`` peer times the bare matrix products of the im2col formulation of each step
(:class:`ConvMatmulPeer`: ~136 MFLOP per image, every product one GEMM over the batch, no copies).
A framework that is not installed is reported as skipped. The test negative ELBO is computed by
npvae's float64 ConvVAE (which the tests hold to torch's within 1e-12) on the first 2,000 test
images, with the same noise for every peer. One thread per framework::

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false" \\
        PYTHONPATH=. python scripts/bench.py --model conv-vae --data-dir ../shared/data/fashion-mnist --epochs 3

``--json PATH`` writes every number (per-epoch times included) for CI or the README.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

import npvae
from npvae import data

REPO = Path(__file__).resolve().parents[1]
D = 784  # pixels per image
PEERS = ("npvae", "torch", "jax")
TITLES = {
    "npvae": "npvae (Numba backend)",
    "npvae-numpy": "npvae (NumPy backend)",
    "torch": "PyTorch eager",
    "jax": "JAX jit",
    "matmul": "bare matmuls (NumPy BLAS)",
}
TARGETS = (  # (name, numerator, denominator, threshold): numerator s/epoch <= threshold x denominator's
    ("npvae <= 0.6 x PyTorch eager", "npvae", "torch", 0.6),
    ("npvae <= 0.8 x JAX jit", "npvae", "jax", 0.8),
    ("npvae <= 1.3 x bare-matmul limit", "npvae", "matmul", 1.3),
    ("NumPy backend <= 2 x Numba backend", "npvae-numpy", "npvae", 2.0),
)
CONV_TARGETS = (  # the issue's targets for the convolutional VAE
    ("npvae <= 1.0 x PyTorch eager", "npvae", "torch", 1.0),
    ("NumPy backend <= 3 x Numba backend", "npvae-numpy", "npvae", 3.0),
)
CONV_LIMIT = 10000  # conv-vae: training images per epoch by default (about 1.4 TFLOP)
CONV_TEST = 2000  # conv-vae: test images of the float64 negative-ELBO estimate
VAL_SIZE = 1000  # the Trainer's per-epoch validation set: small, since it is evaluated every epoch
ENV_VARS = ("OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "NPVAE_BACKEND", "XLA_FLAGS")
MIB = 1024.0  # ru_maxrss is in KiB on Linux
# OpenBLAS's worker threads spin for ~0.1 s after their last call (measured: 0.1 CPU-seconds of an idle
# worker); the pause lets them park before the next peer's clock starts.
SETTLE_S = 0.25
# An epoch counts as quiet when the rest of the machine kept less than this many cores busy. On 2
# cores one busy foreign process can slow a 2-thread BLAS or OpenMP peer 10x (its threads spin at
# barriers waiting for the one that lost its core), so quiet epochs get their own median.
QUIET_CORES = 0.1


# ----------------------------------------------------------------------------- model arithmetic


def matmul_flops(batch: int, hidden: int = 400, latent: int = 20) -> int:
    """Floating-point operations of one step's matrix products (2 per multiply-add).

    Forward and weight gradients cost ``2 B I O`` per layer each; input gradients are needed for
    every layer but the first.
    """
    layers = [(D, hidden), (hidden, 2 * latent), (latent, hidden), (hidden, D)]
    per_pass = sum(i * o for i, o in layers)
    return 2 * batch * (2 * per_pass + per_pass - D * hidden)


def epoch_flops(n: int, batch: int, hidden: int = 400, latent: int = 20) -> int:
    full, rest = divmod(n, batch)
    return full * matmul_flops(batch, hidden, latent) + (matmul_flops(rest, hidden, latent) if rest else 0)


def neg_elbo_reference(state: dict, x: np.ndarray, eps: np.ndarray, batch: int = 1000) -> float:
    """One-sample negative ELBO in nats per image, in float64, from a state dict in npvae's layout.

    .. math:: -\\text{ELBO}(x) \\approx \\sum_d [\\text{softplus}(l_d) - x_d l_d]
              + \\tfrac12 \\sum_j (\\mu_j^2 + e^{\\text{logvar}_j} - 1 - \\text{logvar}_j),
              \\quad l = \\text{dec}(\\mu + e^{\\text{logvar}/2} \\epsilon)

    Parameters
    ----------
    state : dict of name -> array
        ``encoder.0``, ``mu``, ``logvar``, ``decoder.0``, ``output`` weights ``(out, in)`` and biases.
    x : (N, D) array in [0, 1]
    eps : (N, Z) array
        The standard-normal draws, shared by every peer.

    Returns
    -------
    float
        Mean over the N images.
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    total = 0.0
    for i in range(0, len(x), batch):
        xb = np.asarray(x[i : i + batch], dtype=np.float64)  # (B, D)
        h = np.maximum(xb @ p["encoder.0.weight"].T + p["encoder.0.bias"], 0.0)  # (B, H)
        mu = h @ p["mu.weight"].T + p["mu.bias"]  # (B, Z)
        logvar = h @ p["logvar.weight"].T + p["logvar.bias"]  # (B, Z)
        z = mu + np.exp(0.5 * logvar) * eps[i : i + batch]
        h2 = np.maximum(z @ p["decoder.0.weight"].T + p["decoder.0.bias"], 0.0)  # (B, H)
        logits = h2 @ p["decoder.1.weight"].T + p["decoder.1.bias"]  # (B, D)
        recon = (np.logaddexp(0.0, logits) - xb * logits).sum()
        kl = 0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar).sum()
        total += recon + kl
    return float(total / len(x))


# ----------------------------------------------------------------------------- data


def load_arrays(dataset: str, data_dir) -> dict:
    """uint8 train and test images (N, 784) and labels, and a description."""
    if dataset == "demo":
        demo = data.load_demo()
        return {"train_x": demo.train_x, "train_y": demo.train_y, "test_x": demo.test_x, "test_y": demo.test_y,
                "description": demo.description}
    train_x, train_y = data.load_mnist_like(dataset, "train", data_dir=data_dir, download=False)
    test_x, test_y = data.load_mnist_like(dataset, "test", data_dir=data_dir, download=False)
    title = data.DATASETS[dataset].title
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
            "description": f"{title} ({len(train_x):,} train / {len(test_x):,} test)"}


def ensure_data(dataset: str, data_dir) -> None:
    """Fetch the files once here, so the workers only ever read them."""
    if dataset == "demo":
        return
    if data.find_dataset_dir(dataset, data_dir, verify=False) is None:
        print(f"{dataset} not found on disk: downloading it", file=sys.stderr)
        try:
            for split in data.SPLITS:
                data.load_mnist_like(dataset, split, data_dir=data_dir, download=True)
        except (FileNotFoundError, data.DownloadError) as exc:  # the data's own one-line hint, no traceback
            sys.exit(f"bench.py: {exc}")


# ----------------------------------------------------------------------------- what each process runs with


def openblas_info() -> dict:
    """NumPy's BLAS as the loaded library reports itself (what threadpoolctl would read)."""
    info = {"threadpoolctl": False}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        pass
    else:
        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            p = pools[0]
            return {"threadpoolctl": True, "library": p.get("internal_api"), "version": p.get("version"),
                    "threads": p.get("num_threads"), "corename": p.get("architecture"),
                    "threading": p.get("threading_layer"), "path": p.get("filepath")}
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "openblas" in line.split()[-1].lower()})
    if not paths:
        blas = np.__config__.CONFIG.get("Build Dependencies", {}).get("blas", {})
        info.update(library=blas.get("name"), version=blas.get("version"), threads=None)
        return info
    lib = ctypes.CDLL(paths[0])
    info["path"] = paths[0]
    info["library"] = "openblas"
    for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"), ("openblas_", "")):
        if hasattr(lib, f"{prefix}get_num_threads{suffix}"):
            def call(name, restype):
                fn = getattr(lib, f"{prefix}{name}{suffix}")
                fn.restype = restype
                return fn()

            info["threads"] = call("get_num_threads", ctypes.c_int)
            info["corename"] = call("get_corename", ctypes.c_char_p).decode()
            info["version"] = call("get_config", ctypes.c_char_p).decode().split()[1]
            info["threading"] = {0: "sequential", 1: "pthreads", 2: "openmp"}.get(call("get_parallel", ctypes.c_int))
            break
    return info


def numba_info() -> dict:
    try:
        import numba
    except ImportError:
        return {"installed": False}
    try:
        layer = numba.threading_layer()
    except ValueError:  # raised until a parallel=True kernel has launched the thread pool
        layer = f"not started (no parallel kernel ran; configured {numba.config.THREADING_LAYER!r})"
    return {"installed": True, "version": numba.__version__, "threading_layer": layer,
            "NUMBA_NUM_THREADS": numba.config.NUMBA_NUM_THREADS, "num_threads": numba.get_num_threads()}


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB


def busy_cpu_seconds(pid: int | None = None) -> float | None:
    """CPU seconds spent so far by the whole machine (``pid`` None) or by one process; None off Linux.

    The machine's count is every state of ``/proc/stat`` but idle and iowait.
    """
    tick = os.sysconf("SC_CLK_TCK")
    try:
        if pid is None:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]
            return (sum(fields) - fields[3] - fields[4]) / tick
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------- the peers (inside workers)


def initial_state(hidden: int, latent: int, seed: int) -> dict:
    """npvae's initial weights, the common start of every peer."""
    return npvae.VAE(hidden=(hidden,), latent_dim=latent, seed=seed).state_dict()


def fused(state: dict) -> dict:
    """State dict -> {enc, heads, dec, out} x {w, b} with the mu and logvar heads as one layer."""
    return {
        "enc_w": state["encoder.0.weight"], "enc_b": state["encoder.0.bias"],
        "heads_w": np.concatenate([state["mu.weight"], state["logvar.weight"]]),
        "heads_b": np.concatenate([state["mu.bias"], state["logvar.bias"]]),
        "dec_w": state["decoder.0.weight"], "dec_b": state["decoder.0.bias"],
        "out_w": state["decoder.1.weight"], "out_b": state["decoder.1.bias"],
    }


def unfused(p: dict, latent: int) -> dict:
    """The inverse of :func:`fused`, as float32 NumPy arrays."""
    p = {k: np.asarray(v, dtype=np.float32) for k, v in p.items()}
    return {
        "encoder.0.weight": p["enc_w"], "encoder.0.bias": p["enc_b"],
        "mu.weight": p["heads_w"][:latent], "mu.bias": p["heads_b"][:latent],
        "logvar.weight": p["heads_w"][latent:], "logvar.bias": p["heads_b"][latent:],
        "decoder.0.weight": p["dec_w"], "decoder.0.bias": p["dec_b"],
        "decoder.1.weight": p["out_w"], "decoder.1.bias": p["out_b"],
    }


class Peer:
    """One framework training one configuration; :meth:`epoch` is timed, the rest is not."""

    def __init__(self, arrays: dict, cfg: dict):
        self.seed, self.batch = cfg["seed"], cfg["batch_size"]
        self.hidden, self.latent = cfg["hidden"], cfg["latent"]
        self.train_u8 = arrays["train_x"][: cfg["limit"]]  # (N, D) uint8
        self.n = len(self.train_u8)
        self.epochs_done = 0

    def permutation(self) -> np.ndarray:
        """This epoch's example order, the one npvae's Trainer uses."""
        return data.epoch_permutation(self.seed, self.epochs_done, self.n)

    def state_dict(self) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NpvaePeer(Peer):
    def __init__(self, arrays, cfg):
        super().__init__(arrays, cfg)
        from npvae.train import TrainConfig, Trainer

        npvae.set_backend(cfg["backend"])
        val = slice(0, VAL_SIZE)
        dataset = data.Dataset(cfg["dataset"], self.train_u8, arrays["train_y"][: self.n], arrays["test_x"][val],
                               arrays["test_y"][val], arrays["test_x"], arrays["test_y"], num_classes=10,
                               description=arrays["description"], is_demo=cfg["dataset"] == "demo")
        if cfg.get("model") == "conv-vae":
            model = npvae.ConvVAE(latent_dim=self.latent, seed=self.seed)
        else:
            model = npvae.VAE(hidden=(self.hidden,), latent_dim=self.latent, seed=self.seed)
        config = TrainConfig(epochs=1, batch_size=self.batch, lr=cfg["lr"], optimizer="adam", patience=None,
                             pictures=False, seed=self.seed)
        self.out_dir = tempfile.mkdtemp(prefix="npvae-bench-")
        self.trainer = Trainer(model, dataset, config, self.out_dir, progress=False, echo=lambda line: None)

    def epoch(self) -> dict:
        self.trainer.config.epochs = self.epochs_done + 1
        result = self.trainer.run(resume=self.epochs_done > 0)
        record = result.history[-1]
        self.epochs_done += 1
        return {"seconds": record["seconds"], "train_loss": record["train_loss"]}

    def state_dict(self) -> dict:
        return self.trainer.model.state_dict()

    def close(self) -> None:
        shutil.rmtree(self.out_dir, ignore_errors=True)


class TorchPeer(Peer):
    def __init__(self, arrays, cfg):
        super().__init__(arrays, cfg)
        import torch
        import torch.nn.functional as F
        from torch import nn

        latent = self.latent

        class TorchVAE(nn.Module):
            def __init__(self, hidden):
                super().__init__()
                self.enc, self.heads = nn.Linear(D, hidden), nn.Linear(hidden, 2 * latent)
                self.dec, self.out = nn.Linear(latent, hidden), nn.Linear(hidden, D)

            def forward(self, x, eps):  # (B, D), (B, Z) -> batch-mean negative ELBO
                mu, logvar = self.heads(F.relu(self.enc(x))).chunk(2, dim=1)
                z = mu + torch.exp(0.5 * logvar) * eps
                logits = self.out(F.relu(self.dec(z)))
                recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
                kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum()
                return (recon + kl) / x.shape[0]

        self.torch = torch
        self.model = TorchVAE(self.hidden)
        p = fused(initial_state(self.hidden, latent, self.seed))
        with torch.no_grad():
            for name in ("enc", "heads", "dec", "out"):
                getattr(self.model, name).weight.copy_(torch.from_numpy(p[f"{name}_w"]))
                getattr(self.model, name).bias.copy_(torch.from_numpy(p[f"{name}_b"]))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"])
        self.x = torch.from_numpy(data.to_float(self.train_u8))  # shares the array
        self.gen = torch.Generator().manual_seed(self.seed)

    def epoch(self) -> dict:
        torch, model, opt = self.torch, self.model, self.optimizer
        perm = torch.from_numpy(self.permutation())
        total = 0.0
        start = time.perf_counter()
        for i in range(0, self.n, self.batch):
            x = self.x[perm[i : i + self.batch]]
            loss = model(x, torch.randn(len(x), self.latent, generator=self.gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
        seconds = time.perf_counter() - start
        self.epochs_done += 1
        return {"seconds": seconds, "train_loss": total / self.n}

    def state_dict(self) -> dict:
        params = {}
        for name in ("enc", "heads", "dec", "out"):
            layer = getattr(self.model, name)
            params[f"{name}_w"], params[f"{name}_b"] = layer.weight.detach().numpy(), layer.bias.detach().numpy()
        return unfused(params, self.latent)


class ConvTorchPeer(Peer):
    """The Keras write-up's conv VAE in PyTorch eager, from npvae's ConvVAE's initial weights."""

    def __init__(self, arrays, cfg):
        super().__init__(arrays, cfg)
        import torch
        import torch.nn.functional as F
        from torch import nn

        latent = self.latent

        def same(size, k, s):  # Keras' "same": (before, after)
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            return total // 2, total - total // 2

        class SameConv(nn.Conv2d):
            def forward(self, x):
                (t, b), (l, r) = (same(n, k, s) for n, k, s in zip(x.shape[2:], self.kernel_size, self.stride))
                return F.conv2d(F.pad(x, (l, r, t, b)), self.weight, self.bias, self.stride)

        class ConvVAE(nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder = nn.Sequential(SameConv(1, 32, 3), nn.ReLU(), SameConv(32, 64, 3, stride=2), nn.ReLU(),
                                             SameConv(64, 64, 3), nn.ReLU(), SameConv(64, 64, 3), nn.ReLU(),
                                             nn.Flatten(), nn.Linear(64 * 14 * 14, 32), nn.ReLU())
                self.mu, self.logvar = nn.Linear(32, latent), nn.Linear(32, latent)
                self.dec = nn.Linear(latent, 14 * 14 * 64)
                self.up = nn.ConvTranspose2d(64, 32, 3, stride=2)  # cropped (0, 1): Keras' "same"
                self.out = SameConv(32, 1, 3)

            def forward(self, x, eps):  # (B, 784), (B, Z) -> batch-mean negative ELBO
                h = self.encoder(x.view(-1, 1, 28, 28))
                mu, logvar = self.mu(h), self.logvar(h)
                z = mu + torch.exp(0.5 * logvar) * eps
                d = F.relu(self.dec(z)).view(-1, 64, 14, 14)
                d = F.relu(self.up(d)[:, :, :28, :28])
                logits = self.out(d).view(len(x), -1)
                recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
                kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum()
                return (recon + kl) / x.shape[0]

        self.torch = torch
        self.model = ConvVAE()
        self.keys = list(conv_initial_state(latent, self.seed))
        with torch.no_grad():
            for p, value in zip(self.model.parameters(), conv_initial_state(latent, self.seed).values()):
                assert tuple(p.shape) == value.shape
                p.copy_(torch.from_numpy(value))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"])
        self.x = torch.from_numpy(data.to_float(self.train_u8))
        self.gen = torch.Generator().manual_seed(self.seed)

    epoch = TorchPeer.epoch

    def state_dict(self) -> dict:
        return {k: p.detach().numpy().copy() for k, p in zip(self.keys, self.model.parameters())}


def _jax_adam_train_step(loss_fn, latent: int, lr: float, beta1=0.9, beta2=0.999, adam_eps=1e-8):
    """One JAX training step (to be jitted): fresh eps, the loss's gradients, and Adam written as
    torch.optim.Adam computes it (its defaults; no optax here)."""
    import jax
    import jax.numpy as jnp

    def train_step(state, images, idx):
        params, m, v, t, key = state
        t = t + 1
        eps = jax.random.normal(jax.random.fold_in(key, t), (idx.shape[0], latent), jnp.float32)
        loss, grads = jax.value_and_grad(loss_fn)(params, jnp.take(images, idx, axis=0), eps)
        m = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, m, grads)
        v = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * g * g, v, grads)
        tf = t.astype(jnp.float32)
        step_size = lr / (1 - beta1**tf)
        bias2_sqrt = jnp.sqrt(1 - beta2**tf)
        params = jax.tree.map(lambda p, m, v: p - step_size * m / (jnp.sqrt(v) / bias2_sqrt + adam_eps),
                              params, m, v)
        return (params, m, v, t, key), loss

    return train_step


class ConvJaxPeer(Peer):
    """The Keras write-up's conv VAE in JAX (jit of the whole step: loss, gradients, Adam), from npvae's
    ConvVAE's initial weights; Keras' "same" as explicit pads, the transposed convolution as a
    convolution of the stride-dilated input with the flipped kernel, cropped as npvae's."""

    def __init__(self, arrays, cfg):
        super().__init__(arrays, cfg)
        import jax
        import jax.numpy as jnp
        from jax import lax

        latent, lr = self.latent, cfg["lr"]
        dims = ("NCHW", "OIHW", "NCHW")

        def conv(x, w, b, stride, pads):
            return lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=dims) + b[:, None, None]

        def loss_fn(p, x, eps):  # batch-mean negative ELBO
            h = x.reshape(-1, 1, 28, 28)
            h = jax.nn.relu(conv(h, p["encoder.1.weight"], p["encoder.1.bias"], 1, [(1, 1), (1, 1)]))
            h = jax.nn.relu(conv(h, p["encoder.2.weight"], p["encoder.2.bias"], 2, [(0, 1), (0, 1)]))
            h = jax.nn.relu(conv(h, p["encoder.3.weight"], p["encoder.3.bias"], 1, [(1, 1), (1, 1)]))
            h = jax.nn.relu(conv(h, p["encoder.4.weight"], p["encoder.4.bias"], 1, [(1, 1), (1, 1)]))
            h = jax.nn.relu(h.reshape(len(x), -1) @ p["encoder.6.weight"].T + p["encoder.6.bias"])
            mu = h @ p["mu.weight"].T + p["mu.bias"]
            logvar = h @ p["logvar.weight"].T + p["logvar.bias"]
            z = mu + jnp.exp(0.5 * logvar) * eps
            d = jax.nn.relu(z @ p["decoder.0.weight"].T + p["decoder.0.bias"]).reshape(-1, 64, 14, 14)
            wt = p["decoder.2.weight"].transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]  # (C_out, C_in, kH, kW), flipped
            d = lax.conv_general_dilated(d, wt, (1, 1), [(2, 1), (2, 1)], lhs_dilation=(2, 2), dimension_numbers=dims)
            d = jax.nn.relu(d + p["decoder.2.bias"][:, None, None])  # 29 rows cropped to 28 at the bottom
            logits = conv(d, p["decoder.3.weight"], p["decoder.3.bias"], 1, [(1, 1), (1, 1)]).reshape(len(x), -1)
            recon = jnp.sum(jax.nn.softplus(logits) - x * logits)
            kl = 0.5 * jnp.sum(mu**2 + jnp.exp(logvar) - 1.0 - logvar)
            return (recon + kl) / x.shape[0]

        self.jax = jax
        self.loss_fn = loss_fn
        self.step = jax.jit(_jax_adam_train_step(loss_fn, latent, lr))
        params = {k: jnp.asarray(v) for k, v in conv_initial_state(latent, self.seed).items()}
        m0, v0 = jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params)
        self.state = (params, m0, v0, jnp.int32(0), jax.random.key(self.seed))
        self.host_x = aligned_floats(self.train_u8)
        self.data = jnp.from_dlpack(self.host_x)

    def epoch(self) -> dict:
        return JaxPeer.epoch(self)

    def state_dict(self) -> dict:
        return {k: np.asarray(v) for k, v in self.state[0].items()}


class ConvMatmulPeer(Peer):
    """The bare matrix products of one epoch of the conv VAE in the im2col formulation, nothing else.

    Per step of batch B, for every layer, each product as one GEMM over the whole batch through
    NumPy's BLAS, on fixed random operands with ``out=`` buffers (no im2col or col2im copies, no
    bias, activation, loss or Adam): a convolution's forward ``W_m (O, C k^2) @ cols (C k^2, B P)``,
    its weight gradient ``dY (O, B P) @ cols^T``, and its data gradient in npvae's form, a product of
    a forward's shape (stride 1: the correlation of dY with the flipped kernel; stride 2: the
    per-pixel contributions ``W_m^T (C k^2, O) @ dY (O, B P)`` that col2im scatters); the transposed
    convolution likewise; the dense layers' three products. The 32 -> 1 output convolution is
    included in this form too (npvae runs it as a direct loop instead).
    """

    def __init__(self, arrays, cfg):
        super().__init__(arrays, cfg)
        self.rng = np.random.default_rng(self.seed)
        self.plans: dict[int, list] = {}
        self.pool = self.out_pool = None

    def _plan(self, b: int) -> list:
        if b not in self.plans:
            shapes = conv_products(b, self.latent)
            need_in = max(max(m * k, k * n) for m, k, n in shapes)
            need_out = max(m * n for m, k, n in shapes)
            if self.pool is None or self.pool.size < need_in:
                self.pool = self.rng.standard_normal(need_in, dtype=np.float32)
            if self.out_pool is None or self.out_pool.size < need_out:
                self.out_pool = np.empty(need_out, np.float32)
            self.plans[b] = [(self.pool[: m * k].reshape(m, k), self.pool[: k * n].reshape(k, n),
                              self.out_pool[: m * n].reshape(m, n)) for m, k, n in shapes]
        return self.plans[b]

    def epoch(self) -> dict:
        plans = [self._plan(min(self.batch, self.n - i)) for i in range(0, self.n, self.batch)]
        mm = np.matmul
        start = time.perf_counter()
        for plan in plans:
            for a, bm, out in plan:
                mm(a, bm, out=out)
        seconds = time.perf_counter() - start
        self.epochs_done += 1
        return {"seconds": seconds, "gflops_per_second": conv_epoch_flops(self.n, self.batch, self.latent) / seconds / 1e9}


def conv_products(b: int, z: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every product of a conv-VAE step at batch b and latent z, as :class:`ConvMatmulPeer` runs them."""
    p28, p14 = b * 784, b * 196

    def conv(o, ck, p):  # forward, weight gradient
        return [(o, ck, p), (o, p, ck)]

    return [*conv(32, 9, p28),  # encoder.1 (1 -> 32): no data gradient
            *conv(64, 288, p14), (288, 64, p14),  # encoder.2 (32 -> 64, stride 2), dx as contributions
            *conv(64, 576, p14), (64, 576, p14),  # encoder.3, dx a stride-1 correlation
            *conv(64, 576, p14), (64, 576, p14),  # encoder.4
            (b, 12544, 32), (32, b, 12544), (b, 32, 12544),  # encoder.6 dense
            (b, 32, 2 * z), (2 * z, b, 32), (b, 2 * z, 32),  # heads
            (b, z, 12544), (12544, b, z), (b, 12544, z),  # decoder.0 dense
            (288, 64, p14), (64, p14, 288), (64, 288, p14),  # decoder.2 transposed: contributions, dW, dx
            *conv(1, 288, p28), (32, 9, p28)]  # decoder.3 (32 -> 1), dx a stride-1 correlation


def conv_epoch_flops(n: int, batch: int, z: int) -> int:
    """Multiply-add FLOPs of one epoch's products (:func:`conv_products`), ragged last batch included."""
    return sum(2 * m * k * q for i in range(0, n, batch) for m, k, q in conv_products(min(batch, n - i), z))


def conv_initial_state(latent: int, seed: int) -> dict:
    """npvae's ConvVAE's initial weights (state-dict order: encoder, mu, logvar, decoder)."""
    return npvae.ConvVAE(latent_dim=latent, seed=seed).state_dict()


def conv_neg_elbo(state: dict, x: np.ndarray, eps: np.ndarray, latent: int) -> float:
    """One-sample negative ELBO (nats per image) of a ConvVAE state dict, in float64."""
    model = npvae.ConvVAE(latent_dim=latent, dtype=np.float64)
    model.load_state_dict(state)
    total = 0.0
    for i in range(0, len(x), 500):
        recon, kl = model.forward(x[i : i + 500], eps=eps[i : i + 500])
        total += float(recon.sum() + kl.sum())
    return total / len(x)


def aligned_floats(images: np.ndarray, align: int = 64, chunk: int = 10000) -> np.ndarray:
    """``npvae.data.to_float(images)`` written chunk by chunk into an ``align``-byte-aligned float32 array."""
    raw = np.empty(images.size + align // 4, np.float32)
    start = (-raw.ctypes.data % align) // 4
    out = raw[start : start + images.size].reshape(images.shape)
    for i in range(0, len(out), chunk):
        out[i : i + chunk] = data.to_float(images[i : i + chunk])
    return out


class JaxPeer(Peer):
    def __init__(self, arrays, cfg):
        super().__init__(arrays, cfg)
        import jax
        import jax.numpy as jnp

        latent, lr = self.latent, cfg["lr"]

        def loss_fn(p, x, eps):  # batch-mean negative ELBO
            h = jax.nn.relu(x @ p["enc_w"].T + p["enc_b"])
            heads = h @ p["heads_w"].T + p["heads_b"]
            mu, logvar = heads[:, :latent], heads[:, latent:]
            z = mu + jnp.exp(0.5 * logvar) * eps
            logits = jax.nn.relu(z @ p["dec_w"].T + p["dec_b"]) @ p["out_w"].T + p["out_b"]
            recon = jnp.sum(jax.nn.softplus(logits) - x * logits)
            kl = 0.5 * jnp.sum(mu**2 + jnp.exp(logvar) - 1.0 - logvar)
            return (recon + kl) / x.shape[0]

        self.jax = jax
        self.step = jax.jit(_jax_adam_train_step(loss_fn, latent, lr))
        params = {k: jnp.asarray(v) for k, v in fused(initial_state(self.hidden, latent, self.seed)).items()}
        m0, v0 = jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params)
        self.state = (params, m0, v0, jnp.int32(0), jax.random.key(self.seed))  # (params, m, v, step, key)
        # JAX aliases a 64-byte-aligned host array instead of copying it: one float copy of the
        # images, as in the other peers, so peak memory compares like with like.
        self.host_x = aligned_floats(self.train_u8)
        self.data = jnp.from_dlpack(self.host_x)

    def epoch(self) -> dict:
        perm = self.permutation().astype(np.int32)
        losses = []
        start = time.perf_counter()
        for i in range(0, self.n, self.batch):
            self.state, loss = self.step(self.state, self.data, perm[i : i + self.batch])
            losses.append(loss)
        self.jax.block_until_ready((self.state, losses))
        seconds = time.perf_counter() - start
        sizes = np.diff(np.append(np.arange(0, self.n, self.batch), self.n))
        self.epochs_done += 1
        return {"seconds": seconds, "train_loss": float(np.dot(np.asarray(losses, dtype=np.float64), sizes) / self.n)}

    def state_dict(self) -> dict:
        return unfused({k: np.asarray(v) for k, v in self.state[0].items()}, self.latent)


class MatmulPeer(Peer):
    """Only the matrix products of the training steps: the machine's limit for this model."""

    def __init__(self, arrays, cfg):
        super().__init__(arrays, cfg)
        p = fused(initial_state(self.hidden, self.latent, self.seed))
        self.w = [p["enc_w"], p["heads_w"], p["dec_w"], p["out_w"]]  # (O, I) each
        self.rng = np.random.default_rng(self.seed)
        self.buffers: dict[int, dict] = {}
        self.dw = [np.empty_like(w) for w in self.w]

    def _buffers(self, b: int) -> dict:
        """Operands of one step at batch size b; x, z and the upstream gradients are fixed random values."""
        if b not in self.buffers:
            H, Z = self.hidden, self.latent
            rand = lambda *shape: self.rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
            empty = lambda *shape: np.empty(shape, np.float32)  # noqa: E731
            self.buffers[b] = {
                "x": self.rng.random((b, D), dtype=np.float32), "z": rand(b, Z),
                "h": empty(b, H), "heads": empty(b, 2 * Z), "h2": empty(b, H), "logits": empty(b, D),
                "dlogits": rand(b, D), "dheads": rand(b, 2 * Z),  # what the elementwise ops would pass back
                "dh2": empty(b, H), "dz": empty(b, Z), "dh": empty(b, H),
            }
        return self.buffers[b]

    def epoch(self) -> dict:
        w1, w2, w3, w4 = self.w
        dw1, dw2, dw3, dw4 = self.dw
        mm = np.matmul
        bufs = [self._buffers(min(self.batch, self.n - i)) for i in range(0, self.n, self.batch)]
        start = time.perf_counter()
        for s in bufs:
            x, h, heads, z, h2, logits = s["x"], s["h"], s["heads"], s["z"], s["h2"], s["logits"]
            dlogits, dheads, dh2, dz, dh = s["dlogits"], s["dheads"], s["dh2"], s["dz"], s["dh"]
            mm(x, w1.T, out=h)  # forward
            mm(h, w2.T, out=heads)
            mm(z, w3.T, out=h2)
            mm(h2, w4.T, out=logits)
            mm(dlogits.T, h2, out=dw4)  # backward
            mm(dlogits, w4, out=dh2)
            mm(dh2.T, z, out=dw3)
            mm(dh2, w3, out=dz)
            mm(dheads.T, h, out=dw2)
            mm(dheads, w2, out=dh)
            mm(dh.T, x, out=dw1)
        seconds = time.perf_counter() - start
        self.epochs_done += 1
        flops = epoch_flops(self.n, self.batch, self.hidden, self.latent)
        return {"seconds": seconds, "gflops_per_second": flops / seconds / 1e9}


PEER_CLASSES = {"npvae": NpvaePeer, "npvae-numpy": NpvaePeer, "torch": TorchPeer, "jax": JaxPeer, "matmul": MatmulPeer,
                "torch-conv": ConvTorchPeer, "jax-conv": ConvJaxPeer, "matmul-conv": ConvMatmulPeer}


def thread_report(kind: str) -> dict:
    report = {"blas": openblas_info()}
    if kind.startswith("npvae"):
        report["npvae_backend"] = npvae.get_backend()
        report["numba"] = numba_info()
    elif kind == "torch":
        import torch

        backend = next((line.split(":", 1)[1].strip() for line in torch.__config__.parallel_info().splitlines()
                        if line.startswith("ATen parallel backend")), None)
        report["torch"] = {"version": torch.__version__, "intra_op_threads": torch.get_num_threads(),
                           "inter_op_threads": torch.get_num_interop_threads(), "parallel_backend": backend}
    elif kind == "jax":
        import jax

        report["jax"] = {"version": jax.__version__, "devices": [str(d) for d in jax.devices()],
                         "XLA_FLAGS": os.environ.get("XLA_FLAGS")}
    return report


def worker_main() -> None:
    """Serve one peer: JSON commands on stdin, one JSON reply per line on the original stdout.

    Anything else written to stdout (by the frameworks or by C code) goes to stderr instead.
    """
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    arrays, peer, kind = None, None, None
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            op = cmd["op"]
            if op == "setup":
                cfg = cmd["config"]
                kind = cfg["kind"]
                if arrays is None:
                    arrays = load_arrays(cfg["dataset"], cfg["data_dir"])
                    if kind == "torch":
                        import torch  # noqa: F401  imported before the baseline, like npvae and numpy
                    elif kind == "jax":
                        import jax  # noqa: F401
                    baseline = max_rss_mib()
                if peer is not None:
                    peer.close()
                conv_kind = f"{kind}-conv" if cfg.get("model") == "conv-vae" else None
                peer = PEER_CLASSES[conv_kind if conv_kind in PEER_CLASSES else kind](arrays, cfg)
                result = {"n_train": peer.n, "n_test": len(arrays["test_x"]), "description": arrays["description"],
                          "rss_baseline_mib": baseline}
            elif op == "epoch":
                result = peer.epoch()
            elif op == "finish":
                result = {"threads": thread_report(kind), "peak_rss_mib": max_rss_mib(), "rss_baseline_mib": baseline}
                if kind != "matmul":
                    x = arrays["test_x"][:CONV_TEST] if cfg.get("model") == "conv-vae" else arrays["test_x"]
                    eps = np.random.default_rng([peer.seed, 12345]).standard_normal((len(x), peer.latent))
                    x = data.to_float(x, dtype=np.float64)
                    result["test_neg_elbo"] = (conv_neg_elbo(peer.state_dict(), x, eps, peer.latent)
                                               if cfg.get("model") == "conv-vae" else
                                               neg_elbo_reference(peer.state_dict(), x, eps))
            elif op == "exit":
                break
            else:
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, "result": result}
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
    if peer is not None:
        peer.close()


# ----------------------------------------------------------------------------- the coordinator side


class Worker:
    """A peer's subprocess, driven one command at a time."""

    def __init__(self, kind: str):
        self.kind = kind
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)

    def send(self, op: str, **fields) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} worker exited (status {self.proc.wait()}); its error is above")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"the {self.kind} worker failed:\n{reply['error']}")
        return reply["result"]

    def call(self, op: str, **fields) -> dict:
        self.send(op, **fields)
        return self.receive()

    def epoch(self) -> dict:
        """Train one epoch; adds how many cores this peer and everything else kept busy meanwhile.

        The CPU counts cover the whole call (npvae's evaluation and checkpoint included), so they
        describe the conditions of the epoch rather than account for its timed part exactly.
        """
        machine, own, start = busy_cpu_seconds(), busy_cpu_seconds(self.proc.pid), time.perf_counter()
        record = self.call("epoch")
        wall = time.perf_counter() - start
        machine_after, own_after = busy_cpu_seconds(), busy_cpu_seconds(self.proc.pid)
        if None not in (machine, own, machine_after, own_after):
            record["own_cores"] = (own_after - own) / wall
            record["other_cores"] = max(0.0, (machine_after - machine) - (own_after - own)) / wall
        return record

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def start_workers(configs: dict) -> dict:
    """Start every worker, then set them up concurrently (imports and data loading are untimed)."""
    workers = {kind: Worker(kind) for kind in configs}
    try:
        for kind, worker in workers.items():
            worker.send("setup", config=configs[kind])
        setups = {kind: worker.receive() for kind, worker in workers.items()}
    except BaseException:
        close_all(workers)
        raise
    return workers, setups


def close_all(workers: dict) -> None:
    for worker in workers.values():
        worker.close()


def summarize(records: list[dict], images: int) -> dict:
    """Median over the epochs after the first, what the first cost on top, and the load meanwhile."""
    seconds = [r["seconds"] for r in records]
    timed = seconds[1:]
    median = statistics.median(timed)
    summary = {
        "epoch_seconds": seconds,
        "seconds_per_epoch": median,
        "images_per_second": images / median,
        "min_seconds": min(timed),
        "first_epoch_overhead_s": seconds[0] - median,
        "spread": (max(timed) - min(timed)) / median if len(timed) > 1 else None,
    }
    if all("other_cores" in r for r in records):
        summary["epoch_other_cores"] = [r["other_cores"] for r in records]
        summary["own_cores"] = statistics.mean(r["own_cores"] for r in records[1:])
        summary["other_cores"] = statistics.mean(r["other_cores"] for r in records[1:])
        quiet = [r["seconds"] for r in records[1:] if r["other_cores"] < QUIET_CORES]
        summary["quiet_epochs"] = len(quiet)
        summary["quiet_seconds_per_epoch"] = statistics.median(quiet) if quiet else None
    return summary


def targets_of(peers: dict, table=TARGETS) -> tuple[dict, list[dict]]:
    """The s/epoch ratios and each target's verdict, from all timed epochs and from the quiet ones."""
    ratios, targets = {}, []
    for name, num, den, threshold in table:
        row = {"target": name, "threshold": threshold}
        for suffix, field in (("", "seconds_per_epoch"), ("_quiet", "quiet_seconds_per_epoch")):
            a, b = (peers.get(kind, {}).get(field) for kind in (num, den))
            ratio = a / b if a is not None and b is not None else None
            row[f"ratio{suffix}"] = ratio
            row[f"result{suffix}"] = "n/a" if ratio is None else ("PASS" if ratio <= threshold else "FAIL")
            if ratio is not None:
                ratios[f"{num}/{den}{suffix}"] = ratio
        if row["ratio_quiet"] is None and row["ratio"] is not None:  # every epoch shared the CPU: no fair timing
            row["result_quiet"] = "no verdict"
        targets.append(row)
    return ratios, targets


def run_benchmark(args, echo) -> dict:
    kinds = []
    skipped = {}
    conv = args.model == "conv-vae"
    for peer in args.peers:
        if importlib.util.find_spec(peer) is not None:
            kinds.append(peer)
        else:
            skipped[peer] = f"{peer} is not installed"
    if args.numpy_backend:
        kinds.append("npvae-numpy")
    kinds.append("matmul")
    epochs = {kind: args.epochs for kind in kinds}
    if args.numpy_backend:
        epochs["npvae-numpy"] = max(2, min(args.numpy_epochs, args.epochs))
    base = {"dataset": args.dataset, "data_dir": args.data_dir, "limit": args.limit, "seed": args.seed,
            "batch_size": args.batch_size, "lr": args.lr, "hidden": 400, "latent": 20, "model": args.model}
    configs = {kind: {**base, "kind": kind, "backend": "numpy" if kind == "npvae-numpy" else "auto"} for kind in kinds}
    workers, setups = start_workers(configs)
    first = setups[kinds[0]]
    n = first["n_train"]
    echo(f"{first['description']}: training on {n:,} images, {args.epochs} epochs, batch {args.batch_size}; "
         f"peers {', '.join(kinds)}" + "".join(f"; {k} skipped ({why})" for k, why in skipped.items()))
    records = {kind: [] for kind in kinds}
    try:
        for e in range(args.epochs):
            for kind in kinds:
                if e < epochs[kind]:
                    time.sleep(SETTLE_S)
                    rec = workers[kind].epoch()
                    records[kind].append(rec)
                    echo(f"  epoch {e + 1}/{epochs[kind]}  {kind:<12} {rec['seconds']:7.2f} s  "
                         f"{n / rec['seconds']:>9,.0f} img/s" +
                         (f"  loss {rec['train_loss']:.2f}" if "train_loss" in rec else "") +
                         (f"  cores: own {rec['own_cores']:.1f}, others {rec['other_cores']:.1f}" if "own_cores" in rec else ""))
        finals = {kind: workers[kind].call("finish") for kind in kinds}
    finally:
        close_all(workers)

    peers = {}
    for kind in kinds:
        row = summarize(records[kind], n)
        fin = finals[kind]
        row.update(epochs=epochs[kind], peak_rss_mib=fin["peak_rss_mib"],
                   rss_baseline_mib=fin["rss_baseline_mib"], rss_delta_mib=fin["peak_rss_mib"] - fin["rss_baseline_mib"],
                   threads=fin["threads"])
        if "test_neg_elbo" in fin:
            row["test_neg_elbo"] = fin["test_neg_elbo"]
            row["train_loss"] = [r["train_loss"] for r in records[kind]]
        if kind == "matmul":
            flops = conv_epoch_flops(n, args.batch_size, base["latent"]) if conv else epoch_flops(n, args.batch_size)
            row["gflops_per_second"] = flops / row["seconds_per_epoch"] / 1e9
        peers[kind] = row
    ratios, targets = targets_of(peers, CONV_TARGETS if conv else TARGETS)
    return {
        "mode": "benchmark",
        "command": command_line(args.argv),
        "machine": machine_info(),
        "config": {**base, "epochs": args.epochs, "n_train": n, "n_test": CONV_TEST if conv else first["n_test"],
                   "data": first["description"],
                   "model": ("the Keras write-up's conv VAE, latent 20, Bernoulli decoder" if conv else
                             "VAE 784-400-20-400-784 ReLU, Bernoulli decoder"),
                   "optimizer": "Adam", "dtype": "float32"},
        "method": {
            "seconds_per_epoch": "median over epochs 2..E of the training steps' wall time (npvae: the Trainer "
                                 "record's 'seconds'); epochs alternate between peers",
            "first_epoch_overhead_s": "first epoch minus the median",
            "other_cores": "CPU seconds of every other process on the machine during an epoch call, per wall "
                           "second (/proc/stat minus the peer's own); quiet epochs: below " + str(QUIET_CORES),
            "memory": "each peer runs in its own subprocess; peak_rss_mib is that process's getrusage ru_maxrss; "
                      "rss_delta_mib is the peak minus ru_maxrss after imports and uint8 data loading (before setup)",
            "test_neg_elbo": "one-sample negative ELBO, nats/image, float64 NumPy reference on every peer's "
                             "trained weights with the same eps, over the test split",
            "val_split": f"the Trainer's validation set is the first {VAL_SIZE:,} test images (not selected on)",
        },
        "peers": peers,
        "skipped": skipped,
        "ratios": ratios,
        "targets": targets,
    }


def sweep_configs(args, n_available: int) -> list[tuple[str, int, dict]]:
    """(what varies, its value, config) rows, each varying one thing from the default."""
    base_n = min(args.limit or 20000, n_available)
    default = {"batch_size": 128, "hidden": 400, "latent": 20, "limit": base_n}
    rows = [("batch size", b, {**default, "batch_size": b}) for b in args.sweep_batch]
    rows += [("hidden width", h, {**default, "hidden": h}) for h in args.sweep_hidden]
    rows += [("latent size", z, {**default, "latent": z}) for z in args.sweep_latent]
    rows += [("training images", s, {**default, "limit": s}) for s in args.sweep_sizes if s <= n_available]
    return rows


def run_sweep(args, echo) -> dict:
    """Round-robin: each round sets up every configuration afresh and trains one epoch of npvae and one
    of its bare matmuls, so the machine's drift over minutes touches every row alike."""
    base = {"dataset": args.dataset, "data_dir": args.data_dir, "seed": args.seed, "lr": args.lr, "backend": "auto"}
    first = {**base, "batch_size": 128, "hidden": 400, "latent": 20, "limit": None}
    workers, setups = start_workers({"npvae": {**first, "kind": "npvae"}, "matmul": {**first, "kind": "matmul"}})
    n_available = setups["matmul"]["n_train"]
    plan = sweep_configs(args, n_available)
    configs = {tuple(sorted(cfg.items())): cfg for _, _, cfg in plan}  # the default row is measured once
    records = {key: {kind: [] for kind in workers} for key in configs}
    try:
        for round_ in range(args.epochs):
            for key, cfg in configs.items():
                for kind, worker in workers.items():
                    worker.call("setup", config={**base, **cfg, "kind": kind})
                for kind, worker in workers.items():
                    time.sleep(SETTLE_S)
                    records[key][kind].append(worker.epoch())
            echo(f"  round {round_ + 1}/{args.epochs}: {len(configs)} configurations")
        threads = workers["npvae"].call("finish")["threads"]
    finally:
        close_all(workers)
    measured = {}
    for key, cfg in configs.items():
        ours, limit = records[key]["npvae"], records[key]["matmul"]
        # Fastest epoch: noise only ever adds time. Each is a fresh model's first epoch (Numba compiles
        # or loads its kernels once per process, in round 1, which the minimum leaves out).
        t, m = min(r["seconds"] for r in ours), min(r["seconds"] for r in limit)
        n = cfg["limit"]
        flops = epoch_flops(n, cfg["batch_size"], cfg["hidden"], cfg["latent"])
        loads = [r["other_cores"] for r in ours if "other_cores" in r]
        measured[key] = {"n_train": n, "seconds_per_epoch": t, "images_per_second": n / t,
                         "matmul_seconds_per_epoch": m, "matmul_share": m / t, "rest_seconds_per_epoch": t - m,
                         "matmul_gflops_per_second": flops / m / 1e9,
                         "other_cores": statistics.mean(loads) if loads else None,
                         "epoch_seconds": [r["seconds"] for r in ours], "matmul_epoch_seconds": [r["seconds"] for r in limit]}
    rows = [{"varied": what, "value": value, **cfg, **measured[tuple(sorted(cfg.items()))]} for what, value, cfg in plan]
    for r in rows:
        echo(f"  {r['varied']:<16} {r['value']:>6}: {r['seconds_per_epoch']:6.2f} s/epoch ({r['images_per_second']:,.0f} img/s), "
             f"matmuls {r['matmul_seconds_per_epoch']:.2f} s ({r['matmul_share']:.0%})")
    return {"mode": "sweep", "command": command_line(args.argv), "machine": machine_info(),
            "config": {**base, "epochs": args.epochs, "data": setups["matmul"]["description"]},
            "method": "rounds: each sets up every configuration afresh and trains one epoch of npvae (Numba backend) "
                      "and one of the same configuration's bare matmuls, in two subprocesses; s/epoch is the fastest "
                      "of the rounds; rest = npvae - matmuls",
            "threads": threads, "rows": rows}


# ----------------------------------------------------------------------------- reporting


def command_line(argv: list[str]) -> str:
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ENV_VARS if k in os.environ)
    script = os.path.relpath(Path(__file__).resolve())
    return " ".join(filter(None, [env, f"PYTHONPATH={shlex.quote(os.path.relpath(REPO))}", "python",
                                  shlex.quote(script), shlex.join(argv)]))


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "env": {k: os.environ.get(k) for k in ENV_VARS}}


def _fmt(x, spec: str, missing: str = "–") -> str:
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def thread_lines(peers: dict) -> list[str]:
    lines = []
    any_threads = next(iter(peers.values()))["threads"]
    blas = any_threads["blas"]
    lines.append(f"- NumPy BLAS: {blas.get('library')} {blas.get('version')} ({blas.get('corename')} kernels, "
                 f"{blas.get('threading')}), {blas.get('threads')} threads"
                 + (" (threadpoolctl)" if blas.get("threadpoolctl") else " (read from the library with ctypes)"))
    for kind in ("npvae", "npvae-numpy"):
        if kind in peers:
            nb = peers[kind]["threads"]["numba"]
            if nb.get("installed"):
                lines.append(f"- {kind} (backend {peers[kind]['threads']['npvae_backend']}): Numba {nb['version']}, "
                             f"threading layer {nb['threading_layer']}, NUMBA_NUM_THREADS={nb['NUMBA_NUM_THREADS']}")
            break
    if "torch" in peers:
        t = peers["torch"]["threads"]["torch"]
        lines.append(f"- PyTorch {t['version']}: {t['intra_op_threads']} intra-op / {t['inter_op_threads']} inter-op "
                     f"threads ({t['parallel_backend']}), set_num_threads left at its default")
    if "jax" in peers:
        j = peers["jax"]["threads"]["jax"]
        lines.append(f"- JAX {j['version']}: devices {', '.join(j['devices'])}; XLA_FLAGS={j['XLA_FLAGS']}")
    lines.append(f"- OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(not set)')}")
    return lines


def benchmark_markdown(res: dict) -> str:
    cfg, peers = res["config"], res["peers"]
    out = [f"    $ {res['command']}", "",
           f"{cfg['data']}, {cfg['n_train']:,} training images, batch {cfg['batch_size']}, {cfg['model']}, "
           f"float32, Adam {cfg['lr']:g}; {res['machine']['cpus']} CPUs ({res['machine']['cpu']}).", "",
           "| peer | s/epoch | npvae ÷ peer | images/s | spread | others' load (cores) | quiet epochs: s/epoch (n) "
           "| first-epoch overhead (s) | peak RSS (MiB) | RSS growth (MiB) | test −ELBO (nats) | epochs |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ours = peers["npvae"]["seconds_per_epoch"]
    for kind, row in peers.items():
        title = TITLES[kind]
        if kind == "matmul":
            title += f", {row['gflops_per_second']:.0f} GFLOP/s"
        quiet = f"{_fmt(row.get('quiet_seconds_per_epoch'), '.2f')} ({row.get('quiet_epochs', '–')})"
        out.append(f"| {title} | {row['seconds_per_epoch']:.2f} | {ours / row['seconds_per_epoch']:.2f} | "
                   f"{row['images_per_second']:,.0f} | "
                   f"{_fmt(row['spread'], '.0%')} | {_fmt(row.get('other_cores'), '.2f')} | {quiet} | "
                   f"{row['first_epoch_overhead_s']:+.2f} | {row['peak_rss_mib']:,.0f} | {row['rss_delta_mib']:,.0f} | "
                   f"{_fmt(row.get('test_neg_elbo'), '.2f')} | {row['epochs']} |")
    for kind, why in res["skipped"].items():
        out.append(f"| {TITLES[kind]} | – | – | – | – | – | – | – | – | – | – | skipped: {why} |")
    out += ["", "| target | threshold | ratio of s/epoch | result | ratio, quiet epochs | result, quiet epochs |",
            "|---|---:|---:|---|---:|---|"]
    for t in res["targets"]:
        out.append(f"| {t['target']} | {t['threshold']:g} | {_fmt(t['ratio'], '.2f')} | {t['result']} | "
                   f"{_fmt(t['ratio_quiet'], '.2f')} | {t['result_quiet']} |")
    out += ["", "Threads (defaults, as each peer's process reports them):", *thread_lines(peers), "",
            "s/epoch: median over epochs 2..E, epochs alternating between peers; spread: (max − min) / median of "
            "those epochs; first-epoch overhead: epoch 1 minus the median (Numba compilation or cache loading, JAX "
            "tracing); others' load: CPU time of all other processes on the machine during the timed epochs, in "
            f"cores; quiet epochs: those of epochs 2..E during which the others kept < {QUIET_CORES} cores busy "
            "(a result is trustworthy when every peer has some); peak RSS: getrusage max RSS of the peer's own "
            "process, RSS growth: the same minus its value after imports and data loading; test −ELBO: one-sample estimate over the test split, the same float64 "
            "NumPy function and noise for every peer."]
    return "\n".join(out)


def sweep_markdown(res: dict) -> str:
    out = [f"    $ {res['command']}", "",
           f"npvae (Numba backend) on {res['config']['data']}; one thing varied at a time from batch 128, hidden "
           f"400, latent 20; {res['machine']['cpus']} CPUs ({res['machine']['cpu']}).", "",
           "| varied | value | images | s/epoch | images/s | bare matmuls (s) | matmul share | rest (s) "
           "| others' load (cores) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        out.append(f"| {r['varied']} | {r['value']:,} | {r['n_train']:,} | {r['seconds_per_epoch']:.2f} | "
                   f"{r['images_per_second']:,.0f} | {r['matmul_seconds_per_epoch']:.2f} | {r['matmul_share']:.0%} | "
                   f"{r['rest_seconds_per_epoch']:.2f} | {_fmt(r['other_cores'], '.2f')} |")
    out += ["", f"s/epoch: fastest of {res['config']['epochs']} rounds, each of which trains every configuration "
            "for one epoch from a fresh model, then its bare matmuls; rest = s/epoch − bare matmuls (activations, "
            "loss, sampling, Adam, Python); others' load: cores kept busy by other processes during npvae's "
            "epochs, averaged over the rounds."]
    return "\n".join(out)


# ----------------------------------------------------------------------------- command line


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def peer_list(text: str) -> list[str]:
    peers = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown or "npvae" not in peers:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(PEERS)} that includes npvae, "
                                         f"got {text!r}")
    return list(dict.fromkeys(peers))


def parse_args(argv):
    from npvae.cli.parser import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for the method.",
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="vae", choices=("vae", "conv-vae"),
                   help="vae: the 784-400-20 MLP VAE; conv-vae: the Keras write-up's conv VAE with latent 20")
    p.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "mnist", "demo"),
                   help="demo: npvae's shipped 5,000 MNIST digits, no files needed")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset's IDX files")
    p.add_argument("--epochs", type=int, default=None, help="epochs per peer (default 5); with --sweep, rounds (default 3)")
    p.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    p.add_argument("--peers", type=peer_list, default=list(PEERS), help="comma-separated")
    p.add_argument("--numpy-backend", action=argparse.BooleanOptionalAction, default=True,
                   help="also time npvae with set_backend('numpy')")
    p.add_argument("--numpy-epochs", type=int, default=3, help="epochs of the NumPy-backend run (at most --epochs)")
    p.add_argument("--batch-size", type=int, default=128, help="examples per step, every peer")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate, every peer")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the batches")
    p.add_argument("--json", default=None, help="also write every number to this file")
    p.add_argument("--sweep", action="store_true", help="npvae's time per epoch as one setting varies at a time")
    p.add_argument("--sweep-batch", type=int_list, default=[32, 64, 128, 256, 512, 1024],
                   help="--sweep: batch sizes, comma-separated")
    p.add_argument("--sweep-hidden", type=int_list, default=[400, 1024, 2048], help="--sweep: hidden widths")
    p.add_argument("--sweep-latent", type=int_list, default=[2, 8, 20, 64], help="--sweep: latent sizes")
    p.add_argument("--sweep-sizes", type=int_list, default=[10000, 30000, 60000],
                   help="training-set sizes (the other rows use --limit, default 20,000)")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.sweep else 5
    if args.model == "conv-vae":
        if args.sweep:
            p.error("--sweep varies the MLP VAE's sizes; it does not apply to --model conv-vae")
        if args.limit is None:
            args.limit = CONV_LIMIT
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch is reported as overhead, the rest are timed")
    if args.limit is not None and args.limit < args.batch_size:
        p.error(f"--limit must be at least the batch size ({args.batch_size})")
    if args.batch_size < 1:
        p.error("--batch-size must be positive")
    args.argv = list(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--worker"]:
        worker_main()
        return 0
    args = parse_args(argv)
    ensure_data(args.dataset, args.data_dir)

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.sweep:
        result = run_sweep(args, echo)
        text = sweep_markdown(result)
    else:
        result = run_benchmark(args, echo)
        text = benchmark_markdown(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
