"""The model family, built from layer stacks, with one public interface (see :mod:`npvae.models.base`).

- :mod:`~npvae.models.base`: the interface, :class:`LossTerms`, and the capabilities
  :class:`GaussianLatent`, :class:`StandardNormalPrior`, :class:`Conditional`;
- :mod:`~npvae.models.vae`: the Gaussian VAE; :mod:`~npvae.models.cvae`: the conditional VAE;
- :mod:`~npvae.models.autoencoders`: autoencoder, denoising autoencoder, poor man's VAE;
- :mod:`~npvae.models.regularized`: sparse and contractive autoencoders (penalties in :mod:`npvae.penalties`);
- :mod:`~npvae.models.convnets`: the convolutional presets (conv-vae, conv-dae, conv-ae, conv-doc-dae);
- :mod:`~npvae.models.likelihoods`: the reconstruction losses;
- :mod:`~npvae.models.registry`: presets and specs; :mod:`~npvae.models.saving`: ``.npz`` files.
"""

from .autoencoders import Autoencoder, DenoisingAutoencoder, PoorMansVAE
from .base import Conditional, Denoising, GaussianLatent, LossNames, LossTerms, Model, StandardNormalPrior
from .convnets import ConvAutoencoder, ConvDenoisingAutoencoder, ConvDocumentDAE, ConvVAE
from .cvae import CVAE
from .likelihoods import LIKELIHOODS
from .registry import DEFAULT_PRESET, MODEL_CLASSES, MODELS, build_model, from_spec
from .regularized import ContractiveAutoencoder, SparseAutoencoder
from .saving import load_model, save_model
from .vae import VAE

__all__ = [
    "Model", "LossTerms", "LossNames", "GaussianLatent", "StandardNormalPrior", "Conditional", "Denoising",
    "VAE", "CVAE", "Autoencoder", "DenoisingAutoencoder", "PoorMansVAE",
    "SparseAutoencoder", "ContractiveAutoencoder",
    "ConvVAE", "ConvDenoisingAutoencoder", "ConvAutoencoder", "ConvDocumentDAE",
    "LIKELIHOODS", "MODELS", "DEFAULT_PRESET", "MODEL_CLASSES", "build_model", "from_spec", "load_model", "save_model",
]
