"""The pictures of a model: which arrays to compute from a model and which plot draws them.

:mod:`npvae.plots` draws arrays and knows no models; this module runs a model to get those arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import plots


def _value_range(model) -> tuple[float, float]:
    return tuple(model.value_range)


def _clip(images: np.ndarray, model) -> np.ndarray:
    lo, hi = _value_range(model)
    return np.clip(images, lo, hi)


def class_names(dataset_name: str | None, num_classes: int) -> list[str]:
    if dataset_name == "fashion-mnist" and num_classes == 10:
        return list(plots.FASHION_CLASSES)
    return [str(c) for c in range(num_classes)]


def reconstructions(model, x, path, y=None, n: int = 10, title: str | None = None) -> Path:
    """Originals above their reconstructions (the posterior mean decoded)."""
    x = x[:n]
    recon = model.reconstruct(x, y[:n]) if getattr(model, "conditional", False) else model.reconstruct(x)
    return plots.plot_reconstructions(x, _clip(recon, model), path, value_range=_value_range(model),
                                      **({"title": title} if title else {}))


def samples(model, path, rng: np.random.Generator, n: int = 64, label: int | None = None,
            title: str | None = None) -> Path:
    """A grid of decoded prior samples (for a CVAE, of class ``label``, or all classes in turn)."""
    if getattr(model, "conditional", False):
        images = model.sample(n, rng, label=label)
        title = title or (f"Samples of class {label} from the learned prior" if label is not None else None)
    else:
        images = model.sample(n, rng)
    return plots.plot_samples(_clip(images, model), path, value_range=_value_range(model),
                              **({"title": title} if title else {}))


def class_grid(model, path, rng: np.random.Generator, n_per_class: int = 10, names=None) -> Path:
    """One row of samples per class (conditional models)."""
    images = model.class_grid(n_per_class, rng)
    return plots.plot_class_grid(_clip(images, model), path, class_names=names, value_range=_value_range(model))


def epoch_pictures(model, val_x, val_y, out_dir, epoch: int, seed: int = 0, dataset_name: str | None = None) -> list[Path]:
    """The pictures written after each training epoch: under ``out_dir/pictures/`` with the epoch
    number, and the latest copy at the top of ``out_dir`` (``reconstructions.png``, ``samples.png``,
    and ``classes.png`` for conditional models)."""
    out_dir = Path(out_dir)
    written = []
    for name in _names(model):
        path = out_dir / "pictures" / f"{name}_e{epoch:03d}.png"
        rng = np.random.default_rng([seed, 99])  # the same latent draws every epoch: watch them sharpen
        if name == "reconstructions":
            reconstructions(model, val_x, path, val_y, title=f"Validation inputs and reconstructions, epoch {epoch}")
        elif name == "samples":
            samples(model, path, rng, title=f"Samples from the prior, epoch {epoch}")
        else:
            class_grid(model, path, rng, names=class_names(dataset_name, model.config.num_classes))
        latest = out_dir / f"{name}.png"
        latest.write_bytes(path.read_bytes())
        written.append(latest)
    return written


def _names(model) -> list[str]:
    names = ["reconstructions", "samples"]
    if getattr(model, "conditional", False):
        names.append("classes")
    return names
