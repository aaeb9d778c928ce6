"""npvae: variational autoencoders from scratch in NumPy.

Every backward pass is derived by hand (:mod:`npvae.ops`), hot loops run as Numba kernels when
Numba is installed (:mod:`npvae.backend`), and every gradient is tested against PyTorch autograd
and finite differences. The core imports NumPy only.

>>> import numpy as np, npvae
>>> model = npvae.VAE(input_dim=784, hidden=(400,), latent_dim=20)
>>> x = np.random.default_rng(0).random((8, 784), dtype=np.float32)
>>> terms, grads = model.loss_and_grads(x, rng=np.random.default_rng(1))
>>> sorted(grads)[:2]
['decoder.0.bias', 'decoder.0.weight']
"""

from . import conv, ops, penalties
from .backend import get_backend, numba_available, set_backend, use_backend
from .gradcheck import GradCheckReport, check_gradients, check_model, check_op
from .layers import Activation, Conv2d, ConvTranspose2d, Dense, Flatten, MaxPool2d, Reshape, Sequential, Upsample2d
from .models import (CVAE, MODELS, Autoencoder, Conditional, ContractiveAutoencoder, ConvAutoencoder,
                     ConvDenoisingAutoencoder, ConvDocumentDAE, ConvVAE, DenoisingAutoencoder, GaussianLatent, LossTerms,
                     Model, PoorMansVAE, SparseAutoencoder, StandardNormalPrior, VAE, build_model, from_spec, load_model,
                     save_model)
from .optim import OPTIMIZERS, SGD, Adam, AdamW, KerasAdam, KerasRMSprop, RMSprop, clip_grad_norm
from .train import TrainConfig, Trainer, TrainResult, fit

__version__ = "0.1.0"

_LAZY = ("torch", "study", "viz", "cli", "data")  # submodules with optional dependencies, imported on first use


def __getattr__(name: str):
    """``npvae.torch.to_torch(model)`` after ``import npvae`` alone: the submodule (and PyTorch) is imported
    on first use, so that the core still imports NumPy only."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'npvae' has no attribute {name!r}")

__all__ = [
    "MODELS", "VAE", "CVAE", "Autoencoder", "DenoisingAutoencoder", "PoorMansVAE", "SparseAutoencoder",
    "ContractiveAutoencoder", "LossTerms", "build_model",
    "Model", "GaussianLatent", "StandardNormalPrior", "Conditional", "from_spec", "load_model", "save_model",
    "ConvVAE", "ConvDenoisingAutoencoder", "ConvAutoencoder", "ConvDocumentDAE",
    "Sequential", "Dense", "Activation", "Flatten", "Reshape", "Conv2d", "ConvTranspose2d", "MaxPool2d", "Upsample2d",
    "Trainer", "TrainConfig", "TrainResult", "fit",
    "SGD", "RMSprop", "Adam", "AdamW", "KerasRMSprop", "KerasAdam", "OPTIMIZERS", "clip_grad_norm",
    "check_gradients", "check_model", "check_op", "GradCheckReport",
    "get_backend", "set_backend", "use_backend", "numba_available", "ops", "penalties", "conv",
]
