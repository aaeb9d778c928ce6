"""The pictures of a model: which arrays to compute from a model and which plot draws them.

:mod:`npvae.viz.plots` draws arrays and knows no models; this module runs a model to get those arrays.
:data:`FIGURES` holds the pictures ``npvae plot WHAT`` draws, one :class:`Figure` entry each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import ops
from ..checkpoint import atomic_write
from ..data import DATASETS
from ..models import MODELS, Conditional, Denoising, GaussianLatent, LossNames, StandardNormalPrior
from ..registry import Registry
from ..study import statistics
from . import plots


def _value_range(model) -> tuple[float, float]:
    return tuple(model.value_range)


def _clip(images: np.ndarray, model) -> np.ndarray:
    lo, hi = _value_range(model)
    return np.clip(images, lo, hi)


def class_names(dataset_name: str | None, num_classes: int) -> list[str]:
    """The dataset's own names for its classes (its spec's ``class_names``), else the labels as text."""
    spec = DATASETS.get(dataset_name)
    names = spec.class_names if spec is not None else ()
    return list(names) if len(names) == num_classes else [str(c) for c in range(num_classes)]


def _reconstruction_rows(model, paired: bool) -> tuple[tuple[str, ...], str]:
    """The row labels of one block of the reconstruction picture, and what the picture shows."""
    if isinstance(model, Denoising):
        return ("corrupted input", "output", "clean " + ("target" if paired else "original")), \
            "inputs corrupted as in training, the model's outputs, and the clean " + ("targets" if paired else "originals")
    if paired:
        return ("input", "output", "target"), "inputs, the model's outputs, and their targets"
    return ("input", "reconstruction"), "inputs and their reconstructions"


def reconstructions(model, x, path, y=None, n: int = 10, title: str | None = None, *, target=None,
                    rng: np.random.Generator | None = None) -> Path:
    """Inputs above their reconstructions (the code, e.g. the posterior mean, decoded).

    A :class:`~npvae.models.Denoising` model shows what it exists for: rows of corrupted inputs
    (``model.corrupt(x, rng)``, as in training), its outputs, and the clean originals. Paired data
    (``target``, e.g. noisy -> clean scans) adds the targets as a third row.

    Parameters
    ----------
    x : (N, *input_shape) array in the model's range; the first ``n`` are drawn
    y : (N,) labels, for conditional models
    target : (N, *input_shape) array, optional
        What each output should be, when it is not the input itself.
    rng : np.random.Generator, optional
        Draws a denoiser's corruption; default ``np.random.default_rng(0)`` (the same picture each call).
    """
    x = x[:n]
    y = None if y is None else y[:n]
    target = None if target is None else target[:n]
    labels, shows = _reconstruction_rows(model, target is not None)
    clean = None
    if isinstance(model, Denoising):
        clean = x if target is None else target
        x = model.corrupt(x, np.random.default_rng(0) if rng is None else rng)
    elif target is not None:
        clean = target
    recon = model.reconstruct(x, y)
    if title is None:
        title = shows[0].upper() + shows[1:]
    return plots.plot_reconstructions(x, _clip(recon, model), path, title=title, value_range=_value_range(model),
                                      targets=clean, row_labels=labels)


def samples(model, path, rng: np.random.Generator, n: int = 64, label: int | None = None,
            title: str | None = None) -> Path:
    """A grid of decoded prior samples (for a conditional model, of class ``label``, or all classes in turn);
    for a model without a prior (:attr:`~npvae.models.Model.prior_name` None), decoded N(0, I) codes, titled so."""
    if label is not None:
        _check_label(model, label)
        title = title or f"Samples of class {label} from the learned prior"
    if model.prior_name is None:
        title = title or "Decoded N(0, I) codes: no prior, not samples of the data"
    images = model.sample(n, rng, y=label)
    return plots.plot_samples(_clip(images, model), path, value_range=_value_range(model),
                              **({"title": title} if title else {}))


def class_grid(model, path, rng: np.random.Generator, n_per_class: int = 10, names=None) -> Path:
    """One row of samples per class (conditional models)."""
    images = model.class_grid(n_per_class, rng)
    return plots.plot_class_grid(_clip(images, model), path, class_names=names, value_range=_value_range(model))


def epoch_pictures(model, val_x, val_y, out_dir, epoch: int, seed: int = 0, dataset_name: str | None = None,
                   val_target=None) -> list[Path]:
    """The pictures written after each training epoch: under ``out_dir/pictures/`` with the epoch
    number, and the latest copy at the top of ``out_dir`` (``reconstructions.png``, ``samples.png``,
    and ``classes.png`` for conditional models). ``val_target``: paired training's targets.
    Returns those latest copies."""
    out_dir = Path(out_dir)
    written = []
    for name in _names(model):
        path = out_dir / "pictures" / f"{name}_e{epoch:03d}.png"
        rng = np.random.default_rng([seed, 99])  # the same latent draws every epoch: watch them sharpen
        if name == "reconstructions":
            shows = _reconstruction_rows(model, val_target is not None)[1]
            reconstructions(model, val_x, path, val_y, title=f"Validation {shows}, epoch {epoch}", target=val_target,
                            rng=np.random.default_rng([seed, 98]))  # the same corruption every epoch
        elif name == "samples":
            samples(model, path, rng, title=f"Samples from {model.prior_name}, epoch {epoch}")
        else:
            class_grid(model, path, rng, names=class_names(dataset_name, model.num_classes))
        latest = out_dir / f"{name}.png"
        blob = path.read_bytes()
        atomic_write(latest, lambda f: f.write(blob), durable=False)
        written.append(latest)
    return written


def _names(model) -> list[str]:
    names = ["reconstructions"] + (["samples"] if model.prior_name is not None else [])  # an AE has no prior
    if isinstance(model, Conditional):
        names.append("classes")
    return names


def _check_label(model, label) -> None:
    """A label for pictures of one class: needs a conditional model and a class it knows."""
    if not isinstance(model, Conditional):
        conditional = ", ".join(MODELS.where(lambda cls: issubclass(cls, Conditional)))
        raise ValueError(f"a label needs a conditional model ({conditional}); this is a {model.kind}")
    model.check_labels(np.array([label]))


# ----------------------------------------------------------------------------- looking inside a trained model


def _check_latent_model(model, what: str) -> None:
    if not hasattr(model.config, "latent_dim"):
        raise ValueError(f"the {what} picture needs a model with a latent code, got {model!r}")


def interpolation_pairs(y, rows: int, same_class: bool) -> list[tuple[int, int]]:
    """Indices (a, b) of the endpoints of each interpolation row.

    With labels: the first examples of classes (0, 1), (2, 3), ... (cycling through the classes) for
    unconditional models, and two examples of the same class for conditional ones (whose decoder
    is told one class). Without labels: consecutive examples (0, 1), (2, 3), ...
    """
    if y is None:
        return [(2 * r, 2 * r + 1) for r in range(rows)]
    y = np.asarray(y)
    classes = np.unique(y)
    by_class = {c: np.flatnonzero(y == c) for c in classes}
    pairs = []
    for r in range(rows):
        if same_class:
            c = classes[r % len(classes)]
            idx = by_class[c]
            k = r // len(classes)
            if len(idx) < 2 * k + 2:
                raise ValueError(f"not enough examples of class {c} for {rows} interpolation rows")
            pairs.append((int(idx[2 * k]), int(idx[2 * k + 1])))
        else:
            a, b = classes[(2 * r) % len(classes)], classes[(2 * r + 1) % len(classes)]
            k = (2 * r) // len(classes)
            pairs.append((int(by_class[a][k % len(by_class[a])]), int(by_class[b][k % len(by_class[b])])))
    return pairs


def interpolation(model, x, path, y=None, rows: int = 5, steps: int = 10, title: str | None = None) -> Path:
    """Decoded straight-line paths between the codes (posterior means) of pairs of inputs, one per row.

    .. math:: z_t = (1 - t)\\, \\mu(x_a) + t\\, \\mu(x_b), \\quad t = 0, \\tfrac{1}{K-1}, \\dots, 1

    Endpoints are chosen by :func:`interpolation_pairs`; a conditional model decodes each row with
    its endpoints' class.
    """
    _check_latent_model(model, "interpolation")
    if rows < 1 or steps < 2:
        raise ValueError(f"expected rows >= 1 and steps >= 2 (both endpoints), got rows={rows}, steps={steps}")
    pairs = interpolation_pairs(y, rows, isinstance(model, Conditional))
    if max(max(p) for p in pairs) >= len(x):
        raise ValueError(f"{rows} interpolation rows need {2 * rows} inputs, got {len(x)}")
    ends = np.array([i for p in pairs for i in p])
    codes = model.codes(x[ends], None if y is None else np.asarray(y)[ends])
    a, b = codes[0::2], codes[1::2]  # (rows, Z)
    t = np.linspace(0.0, 1.0, steps)[None, :, None]
    z = ((1 - t) * a[:, None] + t * b[:, None]).reshape(rows * steps, -1)  # (rows K, Z)
    images = model.decode(z, None if y is None else np.repeat(np.asarray(y)[ends[0::2]], steps))
    paths = _clip(images, model).reshape(rows, steps, -1)
    return plots.plot_interpolation(paths, path, value_range=_value_range(model), **({"title": title} if title else {}))


def latent_scatter(model, x, y, path, class_names=None, title: str | None = None) -> tuple[Path, np.ndarray | None]:
    """Codes (posterior means) of ``x`` coloured by label; PCA to two dimensions when Z > 2.

    Returns
    -------
    path : Path
    explained : (2,) array or None
        For Z > 2, the fraction of the means' variance each principal component keeps.
    """
    _check_latent_model(model, "latent")
    codes = model.codes(x, y)
    explained = statistics.pca_2d(codes)[1] if codes.shape[1] > 2 else None
    if title is None:
        title = ("Posterior means of the test images" if isinstance(model, GaussianLatent) else
                 "Codes of the test images") + ("" if y is None else ", coloured by class")
    return plots.plot_latent_scatter(codes, y, path, title=title, class_names=class_names), explained


def manifold(model, path, n: int = 20, label: int | None = None) -> Path:
    """Decode an n x n grid over a 2-D latent space, on standard-normal quantiles (the prior's mass).

    Conditional models decode the grid for one class, ``label``.
    """
    _check_latent_model(model, "manifold")
    zdim = model.config.latent_dim
    if zdim != 2:
        raise ValueError(f"the manifold picture decodes a grid over a 2-D latent space, and this model has "
                         f"Z = {zdim}: train one with --latent-dim 2, or look at the 'latent' picture (PCA of the codes)")
    if label is not None:
        _check_label(model, label)
    elif isinstance(model, Conditional):
        raise ValueError(f"{type(model).__name__} is conditional: pass the class to decode the grid for (--label)")

    def decode(z):
        return _clip(model.decode(z, None if label is None else np.full(len(z), label)), model)

    title = ("The learned manifold: decoding a grid over the 2-D latent space" if label is None else
             f"The learned manifold of class {label}: decoding a grid over the 2-D latent space")
    return plots.plot_manifold(decode, path, n=n, latent_dim=zdim, title=title, value_range=_value_range(model))


def posterior_kl_per_dim(model, x, y=None) -> np.ndarray:
    """KL(q(z_j | x) || p(z_j)) per latent dimension j, averaged over the examples: (Z,) float64, nats.

    The prior is N(0, 1), or for a conditional model its prior p(z | y). A dimension whose mean KL
    is near zero carries no information about x: the posterior has collapsed onto the prior there.
    """
    if not isinstance(model, GaussianLatent):
        raise ValueError(f"KL per dimension needs a VAE (a posterior and a prior), got a {model.kind} model")
    mu, logvar = model.encode(x, y)
    prior = None if isinstance(model, StandardNormalPrior) else model.prior(len(mu), y)
    kl = np.empty(mu.shape[1])
    for j in range(mu.shape[1]):
        col = slice(j, j + 1)
        if prior is None:
            kl[j] = ops.kl_normal_forward(mu[:, col], logvar[:, col], "batchmean")[0]
        else:
            kl[j] = ops.kl_gaussians_forward(mu[:, col], logvar[:, col], prior[0][:, col], prior[1][:, col], "batchmean")[0]
    return kl


def kl_per_dim(model, x, path, y=None, threshold: float = 0.01) -> tuple[Path, np.ndarray]:
    """Bar chart of :func:`posterior_kl_per_dim` with the count of active units (KL > threshold nats).

    Returns
    -------
    path : Path
    kl : (Z,) array, the values drawn
    """
    kl = posterior_kl_per_dim(model, x, y)
    title = f"Mean KL per latent unit over {len(x):,} images (the posterior-collapse diagnostic)"
    return plots.plot_kl_per_dim(kl, path, threshold=threshold, title=title), kl


def filters(model, path, n: int = 100) -> Path:
    """The first ``n`` units' first-layer weights as 28x28 tiles (an error for models whose first layer is
    not dense over 784 inputs)."""
    from ..study.regularity import first_layer_filters

    weights = first_layer_filters(model)
    shown = weights[:n]
    return plots.plot_filters(shown, path, title=f"First-layer filters of the {model.kind} "
                                                 f"({len(shown)} of {len(weights)} units)")


def code_histogram(model, x, path, y=None, threshold: float = 0.05) -> tuple[Path, dict]:
    """Histogram of the codes of ``x`` (all activations), and :func:`npvae.study.regularity.code_sparsity`."""
    from ..study.regularity import code_sparsity

    codes = model.codes(x, y)
    return (plots.plot_code_histogram(codes, path, threshold, title=f"Code activations of the {model.kind}"),
            code_sparsity(codes, threshold))


def training_curves(log_path, path, names: LossNames | None = None) -> Path:
    """Loss curves (train and validation) from a run's ``log.jsonl``: the total, and its reconstruction
    and second term for a model that has one, called by the model's ``loss_names``."""
    if names is None:
        return plots.plot_training_curves(log_path, path)
    panels = [(names.total[0].upper() + names.total[1:], "loss")]
    if names.reg is not None:
        panels += [("Reconstruction term", "recon"), (f"{names.reg} term", "reg")]
    per = f"{names.unit} per image" if names.unit else "per image"
    return plots.plot_training_curves(log_path, path, title=f"Training curves ({per})", ylabel=per, panels=panels)


def grad_norms(log_path, path) -> Path:
    """Per-layer gradient norms over training, from a run's ``log.jsonl`` (``--log-grad-norms``)."""
    from ..rundir import read_log

    records = read_log(log_path)  # bounded, one line naming the file for a bad line; read once
    if not any(r.get("event") == "grad_norms" for r in records):
        raise ValueError(f"this run did not log gradient norms ({log_path} has none): train with --log-grad-norms")
    try:
        return plots.plot_grad_norms(records, path, title="Gradient norm of each layer's weights during training")
    except ValueError as exc:
        raise ValueError(f"{log_path}: {exc}. Gradient norms are logged by `npvae train --log-grad-norms`") from None


def gradient_decomposition(rows, path, n: int | None = None) -> Path:
    """Bar chart of the reconstruction and KL parts of each parameter's gradient (npvae.study.gradflow)."""
    where = f" ({n} images)" if n else ""
    return plots.plot_gradient_decomposition(rows, path, title=f"Where each parameter's gradient comes from{where}: "
                                                               "reconstruction vs KL")


def estimator_comparison(table, path) -> Path:
    """Means and variances of each estimator's gradient (:func:`npvae.study.gradflow.compare_estimators`)."""
    return plots.plot_estimator_comparison(
        table, path, title=f"Gradient of {table['objective']} w.r.t. q's mean and log-variance, by estimator")


def snr(rows, path, objective: str = "iwae") -> Path:
    """Signal-to-noise ratio against k, encoder and decoder (:func:`npvae.study.gradflow.estimator_snr`)."""
    bound = "IWAE bound" if objective == "iwae" else "k-sample ELBO"
    return plots.plot_snr(rows, path, title=f"Gradient of the {bound}: signal-to-noise ratio against k, by estimator")


# ----------------------------------------------------------------------------- the registry (npvae plot WHAT)


@dataclass(frozen=True)
class FigureInput:
    """What ``npvae plot`` hands a figure's ``draw``: the model, where to write, and the options.

    ``x`` (N, ...) and ``y`` (N,) are the split's images, prepared as the run prepared them, and
    ``target`` the paired targets of the first ``n`` (None for a run that reconstructed its inputs);
    all three are None unless the figure ``needs_images``. ``log`` is the run's ``log.jsonl`` when the
    figure ``needs_log``.
    """

    model: object
    out: Path
    rng: np.random.Generator
    n: int | None = None
    steps: int = 10
    label: int | None = None
    threshold: float = 0.01
    near_zero: float = 0.05
    split: str = "test"
    dataset_name: str | None = None
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    target: np.ndarray | None = None
    class_names: list[str] | None = None
    log: Path | None = None


@dataclass(frozen=True)
class Figure:
    """One picture ``npvae plot`` draws: its name, its help, what it needs and how it is drawn.

    ``draw(FigureInput) -> (path, lines)`` writes the picture and returns the lines to print beside it;
    ``images(n, steps, model)`` is how many images one picture of ``--n`` holds (checked against the
    limit before anything is drawn).
    """

    name: str
    help: str  # for ``npvae plot --help``
    draw: Callable[[FigureInput], tuple[Path, list[str]]]
    default_n: int | None = None  # what --n means is in the help; None: the figure takes no --n
    needs_images: bool = False  # the split's images (from the run's data, or --data)
    needs_log: bool = False  # the run's log.jsonl beside the checkpoint
    needs_conditional: bool = False  # only for models of p(x | y)
    options: tuple[str, ...] = ()  # the plot options it reads besides --n, --seed and --out (label, steps, ...)
    images: Callable[[int, int, object], int] = lambda n, steps, model: n


FIGURES: Registry[Figure] = Registry("figure")


def sparsity_text(stats: dict) -> str:
    """:func:`npvae.study.regularity.code_sparsity`'s numbers in one line."""
    return (f"mean activation {stats['mean_activation']:.4f}, mean |h| {stats['mean_abs']:.4f}, "
            f"{100 * stats['near_zero']:.1f}% near zero (|h| <= {stats['threshold']:g})")


def _draw_latent(r: FigureInput):
    path, explained = latent_scatter(r.model, r.x, r.y, r.out, class_names=r.class_names)
    lines = [] if explained is None else [
        f"PCA of the {r.model.config.latent_dim}-D codes: the two components keep {100 * explained[0]:.1f}% and "
        f"{100 * explained[1]:.1f}% of their variance"]
    return path, lines


def _draw_kl(r: FigureInput):
    path, kl = kl_per_dim(r.model, r.x, r.out, r.y, threshold=r.threshold)
    active = int((kl > r.threshold).sum())
    return path, [f"mean KL per latent unit over {len(r.x)} {r.split} images (nats): " + " ".join(f"{v:.3f}" for v in kl),
                  f"active units: {active} of {len(kl)} (mean KL > {r.threshold:g} nats); total KL {kl.sum():.3f}"]


def _draw_code_histogram(r: FigureInput):
    path, stats = code_histogram(r.model, r.x, r.out, r.y, threshold=r.near_zero)
    return path, [f"code activations of {len(r.x)} {r.split} images: {sparsity_text(stats)}"]


for _figure in (
    Figure("reconstructions", "test images above their reconstructions (--n pairs); a denoising model's:\n"
           "corrupted input, output and clean original, row under row; a paired run's: input, output, target",
           lambda r: (reconstructions(r.model, r.x, r.out, r.y, n=r.n, rng=r.rng, target=r.target), []),
           default_n=10, needs_images=True, images=lambda n, steps, model: 2 * n),
    Figure("samples", "decoded draws from the prior (--n; --label for a conditional model)",
           lambda r: (samples(r.model, r.out, r.rng, n=r.n, label=r.label), []), default_n=64, options=("label",)),
    Figure("classes", "one row of samples per class, drawn from each class's prior (--n per row)",
           lambda r: (class_grid(r.model, r.out, r.rng, n_per_class=r.n,
                                 names=class_names(r.dataset_name, r.model.num_classes)), []),
           default_n=10, needs_conditional=True, images=lambda n, steps, model: n * model.num_classes),
    Figure("interpolation", "decoded straight lines between two test images' posterior means\n"
           "(--n rows; --steps per row, default 10)",
           lambda r: (interpolation(r.model, r.x, r.out, r.y, rows=r.n, steps=r.steps), []),
           default_n=5, needs_images=True, options=("steps",), images=lambda n, steps, model: n * steps),
    Figure("latent", "posterior means of the test images coloured by label (PCA when Z > 2)", _draw_latent,
           needs_images=True),
    Figure("manifold", "a 2-D model's decoder over a grid of Gaussian quantiles (--n per side;\n"
           "--label for a conditional model); an error for Z != 2",
           lambda r: (manifold(r.model, r.out, n=r.n, label=r.label), []), default_n=20, options=("label",),
           images=lambda n, steps, model: n * n),
    Figure("curves", "loss curves from the run's log.jsonl beside the checkpoint",
           lambda r: (training_curves(r.log, r.out, r.model.loss_names), []), needs_log=True),
    Figure("kl", "mean KL per latent unit over the test images and the number of active units\n"
           "(KL > --threshold nats): the posterior-collapse diagnostic", _draw_kl, needs_images=True,
           options=("threshold",)),
    Figure("grad-norms", "per-layer gradient norms over training, from log.jsonl (train with --log-grad-norms)",
           lambda r: (grad_norms(r.log, r.out), []), needs_log=True),
    Figure("filters", "the first layer's weights as 28x28 tiles, one per unit (--n units); an\n"
           "error for models whose first layer is not dense over 784 inputs",
           lambda r: (filters(r.model, r.out, n=r.n), []), default_n=100),
    Figure("code-histogram", "histogram of every code activation over the test images, the share with\n"
           "|h| <= --near-zero shaded (sparse autoencoders: most should sit near 0)", _draw_code_histogram,
           needs_images=True, options=("near_zero",)),
):
    FIGURES.register(_figure)
del _figure
