"""The write-ups' systems as they train them: one recipe per system, in :data:`RECIPES`.

A recipe is everything ``npvae train --recipe NAME`` needs to train a write-up's system the way the
write-up does: its model preset and options, its loss expressed in npvae's terms, its optimizer with
the write-up's hyperparameters set explicitly, its batch size, epochs, early stopping, noise and data,
and which write-up and section it follows. Options given beside ``--recipe`` override it and are printed
and recorded as departures from the write-up.

npvae's losses are per-image sums (a squared error or negative log-likelihood summed over the pixels),
averaged over the batch. The write-ups' Keras and PyTorch losses are averages over pixels, or sums over
the batch. Each recipe's :attr:`Recipe.derivation` derives the conversion: the KL or penalty weight that
makes npvae's per-image loss proportional to the write-up's, and the factor between them, which the
recipe sets as the training's ``loss_scale`` (the optimizer steps on ``loss_scale`` x npvae's gradient).
Adam and RMSprop are invariant to a loss's scale except through their epsilon (Keras' RMSprop adds it
inside the root, Keras' Adam to the uncorrected root), so with ``loss_scale`` the step is the
write-up's, not only its direction.

Where a write-up leaves something out (no optimizer, no batch size, a network written as ``...``) or
computes something npvae cannot express exactly, the recipe says so in :attr:`Recipe.differs`, with the
reason; npvae's own choice is named there, never passed off as the write-up's.

The write-ups are in the project's shared folder (``writeups/`` beside the repository; its README lists them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .registry import Registry

WRITEUPS = "../shared/writeups"  # the write-ups' folder, relative to the repository


@dataclass(frozen=True)
class Recipe:
    """One write-up system as the write-up trains it.

    ``model_config`` holds preset options (the preset's config fields, as ``npvae train`` flags set
    them); ``train`` holds :class:`npvae.train.TrainConfig` fields. Settings a write-up gives are all
    here, set explicitly even where they equal npvae's defaults.
    """

    name: str
    writeup: str  # file in the write-ups' folder
    section: str  # the part of the write-up the system is in
    network: str  # the write-up's network, in one line
    loss: str  # the write-up's loss as it computes it
    model: str  # the npvae preset (npvae.models.MODELS)
    model_config: dict  # preset options
    train: dict  # TrainConfig fields
    data: str  # what the write-up trains on, and what npvae uses
    dataset: str | None  # the built-in dataset the recipe trains on (None: the user's --data)
    parameters: int | None  # the write-up network's parameter count; None where the write-up gives no network
    derivation: str  # how the write-up's loss and settings become npvae's
    differs: tuple[str, ...] = field(default=())  # what npvae does differently, and why

    def train_settings(self) -> dict:
        """The run's TrainConfig fields: the preset's own defaults, then the recipe's."""
        from .models import MODELS

        return {**MODELS[self.model].train_defaults, **self.train}

    def train_config(self):
        """The :class:`npvae.train.TrainConfig` of a run of this recipe (validated), with its name recorded."""
        from .train import TrainConfig

        config = TrainConfig(**self.train_settings(), recipe=self.name)
        config.validate()
        return config

    def build(self, input_shape=None, dtype=None, seed: int = 0, **overrides):
        """The recipe's model (for data of ``input_shape``; default the write-up's 28x28 rows)."""
        import numpy as np

        from .models import MODELS

        extra = {} if input_shape is None else {"input_shape": tuple(input_shape)}
        return MODELS[self.model](**{**self.model_config, **overrides}, dtype=dtype or np.float32, seed=seed,
                                  **extra)

    def optimizer_text(self) -> str:
        """E.g. ``keras-rmsprop lr 0.001, rho 0.9, epsilon 1e-07; loss x 1/784``."""
        config = self.train_config()
        options = dataclasses.asdict(config.optimizer_options())
        given = [f"{k} {options[k]:g}" if not isinstance(options[k], bool) else f"{k} {options[k]}"
                 for k in options if k in self.train]
        text = f"{config.optimizer} lr {config.lr:g}" + "".join(f", {g}" for g in given)
        if config.loss_scale != 1.0:
            text += f"; loss x {_fraction(config.loss_scale)}"
        return text

    def rows(self) -> list[tuple[str, str]]:
        """What ``npvae recipes NAME`` shows, as (label, text) rows."""
        config = self.train_config()
        return [
            ("follows", f"{WRITEUPS}/{self.writeup}: {self.section}"),
            ("network", self.network + (f" ({self.parameters:,} parameters)" if self.parameters else "")),
            ("loss", self.loss),
            ("model", f"--model {self.model} " + " ".join(f"{k}={_shown(v)}" for k, v in self.model_config.items())),
            ("optimizer", self.optimizer_text()),
            ("batch", str(config.batch_size)),
            ("epochs", f"{config.epochs}" + (f", early stopping after {config.patience} epochs without a better "
                                            "validation loss" if config.patience else ", no early stopping")),
            ("data", self.data),
        ]


def _fraction(value: float) -> str:
    """1/784 for 0.00127..., else the number."""
    inverse = 1.0 / value
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-9 * inverse else f"{value:g}"


def _shown(value) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(map(str, value)) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


RECIPES: Registry[Recipe] = Registry("recipe")

PIXELS = 28 * 28  # the 28x28 images of every write-up but document cleaning
PAGE = 258 * 540  # document cleaning's page size
_NPVAE_BATCH = 128  # npvae's default batch, used where a write-up gives none

_KERAS_TEXT = "autoencoders-keras.txt"
_TORCH_TEXT = "autoencoders-pytorch.txt"
_NO_TRAINING = ("the write-up gives no optimizer, learning rate, batch size or epochs; the recipe uses npvae's "
                "defaults (PyTorch's Adam, lr 1e-3, batch 128, 10 epochs, early stopping after 5 without a better "
                "validation loss)")


RECIPES.register(Recipe(
    name="keras-conv-vae",
    writeup=_KERAS_TEXT, section="the variational autoencoder (Fashion-MNIST, 2-D latent)",
    network="Conv 32; Conv 64 stride 2; Conv 64; Conv 64 (3x3 same ReLU); Dense 32 ReLU; mu, h (Z = 2); "
            "Dense 14*14*64 ReLU, ConvTranspose 32 3x3 stride 2, Conv 1 3x3 sigmoid",
    loss="binary_crossentropy over the flattened batch (a mean over B x 784 pixels) "
         "- 5e-4 * mean_j(1 + h - mu^2 - exp(h)), averaged over the batch",
    model="conv-vae",
    model_config={"latent_dim": 2, "likelihood": "bernoulli", "beta": 784 * 5e-4 * 2 / 2,
                  "parameterization": "logvar"},
    train={"optimizer": "keras-rmsprop", "lr": 1e-3, "rho": 0.9, "epsilon": 1e-7, "loss_scale": 1 / PIXELS,
           "batch_size": 16, "epochs": 20, "patience": None},
    data="Fashion-MNIST (the write-up validates on the test images; npvae holds validation images out of "
         "the training set and reports the test set at the end)",
    dataset="fashion-mnist", parameters=550_629,
    derivation="""\
The write-up's loss of a batch, with Z = 2 latent units, D = 784 pixels and h its second head:

    L_w = (1/(B D)) sum_i sum_d BCE_id + 5e-4 (1/B) sum_i mean_j -(1 + h_ij - mu_ij^2 - exp(h_ij))

Reading h as log sigma^2 (as the KL term does), KL_i = -1/2 sum_j (1 + h_ij - mu_ij^2 - exp(h_ij)), so
mean_j -(...) = (2/Z) KL_i and

    L_w = (1/B) sum_i [ BCE_i / D + 5e-4 (2/Z) KL_i ]    (BCE_i summed over the image's pixels)
        = (1/D) (1/B) sum_i [ BCE_i + D 5e-4 (2/Z) KL_i ].

npvae's loss is (1/B) sum_i [BCE_i + beta KL_i], so beta = 784 * 5e-4 * 2/2 = 0.392 (a KL weight of 5e-4
would be 784 times too weak), and L_w = L_npvae / 784: loss_scale = 1/784 makes the optimizer's gradient
the write-up's. With it, Keras' RMSprop (rho 0.9, epsilon 1e-7 inside the root, lr 1e-3: what
compile(optimizer='rmsprop') builds) takes the write-up's steps exactly; without it epsilon would act
784^2 times more weakly. Another --latent-dim changes the equivalent weight to 0.784 / Z (the write-up
averages over j); the recipe keeps 0.392.""",
    differs=(
        "the write-up samples z = mu + exp(h) eps, reading h as log sigma, while its KL reads h as log sigma^2; "
        "npvae reads h one way in both (--parameterization logvar: the KL as written, the sampler's std "
        "exp(h/2)), since the write-up's mixed reading is not a KL of the distribution it samples",
        "Keras' binary_crossentropy takes the log of probabilities clipped to [1e-7, 1 - 1e-7]; npvae computes "
        "the same function from logits (equal wherever the clip does not bite)",
        "the write-up's code is Keras 2's (Adam(lr=...), from keras import backend as K), whose RMSprop adds "
        "epsilon outside the root, lr g / (sqrt(v) + 1e-7): that rule is --optimizer rmsprop --rho 0.9 "
        "--epsilon 1e-7 here (PyTorch's rule, Keras' constants). The recipe follows Keras 3's 'rmsprop' "
        "(epsilon inside the root); the two differ only on weights whose gradient RMS, in the write-up's loss "
        "units, is below about 3e-4",
    ),
))

RECIPES.register(Recipe(
    name="keras-conv-dae",
    writeup=_KERAS_TEXT, section="the denoising autoencoder on Fashion-MNIST (salt-and-pepper noise)",
    network="Conv 64, 32, 16 (3x3 same ReLU) each with MaxPool 2 same; Conv 16 + Up 2, Conv 32 + Up 2, "
            "Conv 64 3x3 valid + Up 2, Conv 1 3x3 same sigmoid",
    loss="'mse': the mean over B x 28 x 28 of (output - clean)^2, on noisy inputs",
    model="conv-dae",
    model_config={"noise": "salt_pepper", "noise_level": 0.1, "noise_draws": "once"},
    train={"optimizer": "keras-adam", "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-7,
           "loss_scale": 1 / PIXELS, "batch_size": 2048, "epochs": 20, "patience": 10},
    data="Fashion-MNIST, each training and validation image corrupted once (imgaug's SaltAndPepper(0.1) "
         "before training; here npvae's draw of the same noise)",
    dataset="fashion-mnist", parameters=49_761,
    derivation="""\
Keras' 'mse' on (B, 28, 28, 1) images averages over the last axis (one channel) and the loss then over
the batch and the 28 x 28 positions: L_w = (1/(B D)) sum_i SE_i with SE_i the image's summed squared
error and D = 784. npvae's loss is (1/B) sum_i SE_i = D L_w, so loss_scale = 1/784 gives the optimizer
the write-up's gradient; Keras' Adam ('adam': lr 1e-3, beta_1 0.9, beta_2 0.999, epsilon 1e-7 added to
the uncorrected root) then takes the write-up's steps. The noise: imgaug's SaltAndPepper(0.1) replaces
each pixel with probability 0.1 by black or white (one half each), applied once to the training and
validation images before fit(); here --noise-draws once gives every image one fixed noisy copy.
EarlyStopping(monitor='val_loss', min_delta=0, patience=10) is --patience 10.""",
    differs=(
        "the noisy copies are npvae's draws (seeded by --noise-seed and each image), not imgaug's",
        "the write-up validates on the test images; npvae holds validation images out of the training set",
    ),
))

RECIPES.register(Recipe(
    name="keras-doc-cleaner",
    writeup=_KERAS_TEXT, section="the denoising autoencoder for scanned documents (text cleaning)",
    network="Conv 64 3x3 same ReLU, MaxPool 2 same; Conv 64 3x3 same ReLU, Up 2; Conv 1 3x3 same sigmoid, "
            "on 258 x 540 pages",
    loss="'mse': the mean over B x 258 x 540 of (output - clean page)^2",
    model="conv-doc-dae",
    model_config={},
    train={"optimizer": "keras-adam", "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-7,
           "loss_scale": 1 / PAGE, "batch_size": 16, "epochs": 200, "patience": 5},
    data="(noisy, clean) page pairs of 258 x 540: --data NOISY_DIR --target CLEAN_DIR. The write-up's scans "
         "are not included; scripts/make_documents.py renders pages of the same kind",
    dataset=None, parameters=38_145,
    derivation="""\
As for keras-conv-dae, Keras' 'mse' averages over the pixels of each page and the batch:
L_w = (1/(B D)) sum_i SE_i with D = 258 * 540 = 139,320, so npvae's per-page sum is D L_w and
loss_scale = 1/139320 gives the write-up's gradient to Adam(lr=0.001) (Keras' Adam, epsilon 1e-7).
Batch 16, 200 epochs, EarlyStopping(monitor='val_loss', min_delta=0, patience=5). The network is fully
convolutional: it takes pages of any even size, and the scale is exact for 258 x 540 pages only.""",
    differs=(
        "the write-up's data (its preprocessing is only linked) are not available here; npvae trains on "
        "pages rendered by scripts/make_documents.py",
    ),
))

RECIPES.register(Recipe(
    name="pytorch-mlp-ae",
    writeup=_TORCH_TEXT, section="the multilayer-perceptron autoencoder",
    network="784-128-64-12-3 ReLU encoder, 3-12-64-128-784 decoder with a Tanh output",
    loss="mean squared error over the batch and the pixels (nn.MSELoss), on images scaled to [-1, 1]",
    model="ae",
    model_config={"hidden": (128, 64, 12), "latent_dim": 3, "activation": "relu", "output_activation": "tanh"},
    train={"loss_scale": 1 / PIXELS},
    data="28x28 grey images scaled to [-1, 1]; the text names no dataset, npvae uses MNIST",
    dataset="mnist", parameters=219_891,
    derivation="""\
nn.MSELoss's default reduction averages over the batch and the 784 pixels: L_w = (1/(B D)) sum_i SE_i,
npvae's squared error is (1/B) sum_i SE_i = D L_w, so loss_scale = 1/784 gives the write-up's gradient.
The data are scaled to [-1, 1] to match the Tanh output, as the write-up does.""",
    differs=(_NO_TRAINING,),
))

RECIPES.register(Recipe(
    name="pytorch-conv-ae",
    writeup=_TORCH_TEXT, section="the convolutional autoencoder",
    network="Conv(1,16,3,s3,p1) ReLU MaxPool(2,2) Conv(16,8,3,s2,p1) ReLU MaxPool(2,1); ConvT(8,16,3,s2) ReLU "
            "ConvT(16,8,5,s3,p1) ReLU ConvT(8,1,2,s2,p1) Tanh",
    loss="mean squared error over the batch and the pixels, as the MLP autoencoder's, on [-1, 1] images",
    model="conv-ae",
    model_config={},
    train={"loss_scale": 1 / PIXELS},
    data="28x28 grey images scaled to [-1, 1]; the text names no dataset, npvae uses MNIST",
    dataset="mnist", parameters=5_729,
    derivation="""\
The write-up replaces the MLP of pytorch-mlp-ae by this network and keeps its loss: the mean squared
error over B x 784 values, so loss_scale = 1/784 as there.""",
    differs=(_NO_TRAINING,),
))

RECIPES.register(Recipe(
    name="pytorch-vae",
    writeup=_TORCH_TEXT, section="the variational autoencoder",
    network="784-400 ReLU, heads 400-20 (mu, logvar); 20-400 ReLU, 400-784 sigmoid",
    loss="nn.BCELoss(size_average=False) + KLD, both summed over the batch (its comment says MSE; the code "
         "computes BCE)",
    model="vae",
    model_config={"hidden": (400,), "latent_dim": 20, "activation": "relu", "likelihood": "bernoulli",
                  "beta": 1.0},
    train={"loss_scale": float(_NPVAE_BATCH), "batch_size": _NPVAE_BATCH},
    data="MNIST-sized images in [0, 1]; the text names no dataset, npvae uses MNIST",
    dataset="mnist", parameters=652_824,
    derivation="""\
The write-up sums the binary cross-entropy over the batch and the pixels and the KL,
-1/2 sum (1 + logvar - mu^2 - exp(logvar)), over the batch and the latent units: L_w = sum_i (BCE_i + KL_i).
npvae's negative ELBO is (1/B) sum_i (BCE_i + KL_i) = L_w / B: beta = 1, and loss_scale = B gives the
write-up's gradient. The write-up gives no batch size; the recipe uses npvae's 128, so its loss_scale is
128 (a --batch-size departure should come with the same --loss-scale).""",
    differs=(_NO_TRAINING,),
))

RECIPES.register(Recipe(
    name="poor-mans-vae",
    writeup="poor-mans-vae.txt", section="My_VAE_V2 and its loss",
    network="784-392 sigmoid, 392-Z code plus N(0, I) noise, Z-392 sigmoid, 392-784 sigmoid",
    loss="nn.MSELoss(reduction='sum') over the batch + z.pow(2).sum().sqrt(), one L2 norm of the whole batch "
         "of noisy codes",
    model="poor",
    model_config={"hidden": (392,), "latent_dim": 20, "activation": "sigmoid", "output_activation": "sigmoid",
                  "code_penalty": "batch"},
    train={"loss_scale": float(_NPVAE_BATCH), "batch_size": _NPVAE_BATCH},
    data="MNIST digits in [0, 1] (the write-up's pictures are digits)",
    dataset="mnist", parameters=631_924,
    derivation="""\
The write-up's loss of a batch of noisy codes Z (B, Z) is L_w = sum_i SE_i + ||Z||_F (squared error
summed over the batch and pixels; one norm of the whole batch). With --code-penalty batch npvae gives
each example the term ||Z||_F / B, so its loss is (1/B) (sum_i SE_i + ||Z||_F) = L_w / B, and
loss_scale = B gives the write-up's gradient. The per-image penalty (npvae's default, mean_i ||z_i||)
is about sqrt(B) times stronger: 11 times at B = 128. The write-up gives no batch size; the recipe uses
npvae's 128 (a --batch-size departure changes the write-up's penalty's strength, and should come with
the same --loss-scale).""",
    differs=(
        "the write-up passes z_dim as an argument and never states it; the recipe uses npvae's 20 "
        "(the parameter count is for Z = 20)",
        _NO_TRAINING,
    ),
))

RECIPES.register(Recipe(
    name="cvae-learned-prior",
    writeup="cvae-learned-prior.txt", section="CVAE with a PriorEncoder p(z|y), its Loss and train()",
    network="an encoder q(z|x,y), a decoder p(x|z,y) and a prior network p(z|y) over one-hot labels; the "
            "write-up elides their layers (Encoder(...))",
    loss="nn.MSELoss(reduction='mean') + 1e-5 * (KL(q || p(z|y)) summed over the latent units and the batch) / B",
    model="cvae",
    model_config={"likelihood": "gaussian", "beta": 784 * 1e-5 / 2, "learned_prior": True},
    train={"loss_scale": 2 / PIXELS, "epochs": 16, "patience": None},
    data="MNIST digits with their labels (x.reshape(-1, 784), ten classes)",
    dataset="mnist", parameters=None,
    derivation="""\
The write-up's loss per batch: L_w = (1/(B D)) sum_i SE_i + 1e-5 (1/B) sum_i KL_i, with D = 784, SE_i
the image's summed squared error and KL_i the KL to the learned prior (the Gaussian KL it writes out).
Per image that is SE_i / D + 1e-5 KL_i = 1e-5 [SE_i / (2 s^2) + KL_i] with s^2 = D 1e-5 / 2 = 0.00392:
the write-up minimises 1e-5 times the negative ELBO (up to a constant) of a Gaussian decoder of standard
deviation s = 0.0626. npvae's Gaussian likelihood has unit variance, -log p(x|z) = SE_i / 2 + const, so
npvae's loss (1/B) sum_i [SE_i / 2 + beta KL_i] equals (D/2) L_w + const when beta = D 1e-5 / 2 =
0.00392; loss_scale = 2/784 gives the write-up's gradient. Its loop trains num_epoch epochs with no early
stopping; its figures run to epoch 15: 16 epochs.""",
    differs=(
        "the write-up elides the encoder, decoder and prior networks and their output activations; the recipe "
        "uses npvae's cvae (400 hidden units, Z = 20, a 64-unit prior network, the Gaussian mean a sigmoid), "
        "so there is no write-up parameter count to match",
        "its encoders output sigma directly; npvae's output log sigma^2 (the same family)",
        "the write-up's optimizer, learning rate and batch come from a config it does not show (it notes that "
        "large batches converged to worse parameters); the recipe uses npvae's Adam, lr 1e-3, batch 128",
    ),
))

RECIPES.register(Recipe(
    name="sparse-ae",
    writeup=_KERAS_TEXT, section="sparse autoencoders (prose only)",
    network="a code larger than the input, of which only a few units fire; no layers, sizes or penalty given",
    loss="not given",
    model="sparse-ae",
    model_config={"hidden": (), "latent_dim": 1024},
    train={},
    data="Fashion-MNIST (the section's dataset)",
    dataset="fashion-mnist", parameters=None,
    derivation="""\
The write-up says only that a sparse autoencoder's latent dimension is larger than its input's and that
few units fire each time. The recipe makes the code overcomplete, 784 -> 1024 sigmoid units -> 784, and
keeps them mostly silent with npvae's default penalty (each unit's mean activation over the batch
pulled to 0.05 by a KL, weight 3, Ng's notes) on npvae's per-image squared error.""",
    differs=(
        "the write-up gives no network, code size, penalty, weight or training settings: 1024 units, the KL "
        "penalty and its weight are npvae's choices",
        _NO_TRAINING,
    ),
))

RECIPES.register(Recipe(
    name="contractive-ae",
    writeup=_KERAS_TEXT, section="contractive autoencoders (prose only)",
    network="the autoencoder unchanged, a regulariser added to the loss (a neural form of ridge regression)",
    loss="not given",
    model="contractive-ae",
    model_config={},
    train={},
    data="Fashion-MNIST (the section's dataset)",
    dataset="fashion-mnist", parameters=None,
    derivation="""\
The write-up names the idea only. The recipe is npvae's contractive autoencoder (Rifai et al. 2011): one
sigmoid code layer 784 -> 196 -> 784 and lambda ||d code / d x||_F^2 per image, lambda = 0.1, on npvae's
per-image squared error.""",
    differs=(
        "the write-up gives no network, penalty weight or training settings: Rifai et al.'s penalty, 196 units "
        "and lambda 0.1 are npvae's choices",
        _NO_TRAINING,
    ),
))

RECIPES.register(Recipe(
    name="linear-ae",
    writeup=_KERAS_TEXT, section="traditional autoencoders: with linear activations the code is PCA's",
    network="linear layers throughout; no sizes given",
    loss="not given (squared error, the loss under which a linear autoencoder spans PCA's subspace)",
    model="ae",
    model_config={"hidden": (), "latent_dim": 12, "activation": "identity", "output_activation": "identity"},
    train={},
    data="Fashion-MNIST (the section's dataset), scaled to [-1, 1]",
    dataset="fashion-mnist", parameters=None,
    derivation="""\
The write-up's claim: if every activation is linear, the bottleneck's code corresponds to the principal
components. The recipe is the smallest such network, 784 -> Z -> 784 with identity activations and an
identity output, trained on the squared error (Baldi and Hornik: its optimum spans the top-Z principal
subspace of the centred data; the biases do the centring). Z = 12 is npvae's choice; --latent-dim sets
another.""",
    differs=(
        "the write-up gives no network or training settings: one linear layer each way and Z = 12 are "
        "npvae's choices",
        _NO_TRAINING,
    ),
))
