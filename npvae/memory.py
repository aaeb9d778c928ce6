"""How much memory a model, a batch and a picture will take, computed from shapes before anything is allocated.

One estimate serves training, evaluation, sampling and plotting alike:

- **parameters**: the flat parameter buffer, its gradient and the optimizer's two moment buffers
  (``4 * P * itemsize`` bytes for ``P`` scalars; 2 buffers when only inferring);
- **activations per example**: for every layer, its output and the output's gradient, plus the
  im2col columns of a convolution (``C_in kH kW`` values per output pixel of a Conv2d, per input
  pixel of a ConvTranspose2d), walked through the model's parts with the layers' own
  ``output_shape``; times the batch, times ``k`` decoded samples per example for the k-sample
  objectives;
- **decoded images** for pictures: each image at float64 (the figures' working dtype).

The limit is the machine's available memory (``MemAvailable`` in ``/proc/meminfo``, else
``os.sysconf``), or the environment variable ``NPVAE_MEMORY_LIMIT`` (bytes, or with a suffix:
``512M``, ``8G``, ``1T``). A refusal is one :class:`MemoryRefused` line: the size in bytes (and
in GiB), what asked for it (a flag, a ``--config`` file, a checkpoint) and the smaller setting to try.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re

__all__ = ["MemoryRefused", "memory_limit", "human_bytes", "asked_by", "check", "parameter_bytes", "check_parameters",
           "activation_values", "model_inputs", "per_example_bytes", "check_batch", "check_samples", "flags_text"]

ENV_LIMIT = "NPVAE_MEMORY_LIMIT"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class MemoryRefused(ValueError):
    """A setting would need more memory than the machine has; the message says how much, who asked, and what to try."""


def human_bytes(n: int) -> str:
    """E.g. ``32.0 GiB`` (binary units, as the kernel and NumPy's MemoryError count)."""
    value, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            break
        value /= 1024
    return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise MemoryRefused(f"{ENV_LIMIT}={text!r}: expected a size in bytes, or with a suffix K, M, G or T "
                            "(e.g. 8G)")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def _available() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as f:  # a regular pseudo-file of a few KB
            for line in f.read(1 << 16).decode("ascii", "replace").splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def memory_limit() -> tuple[int | None, str]:
    """The bytes npvae may plan to use and where that number comes from (None: unknown, nothing is refused)."""
    text = os.environ.get(ENV_LIMIT)
    if text:
        return _parse_size(text), f"{ENV_LIMIT}={text}"
    return _available(), "the memory this machine has available"


_ASKED_BY: contextvars.ContextVar[str | None] = contextvars.ContextVar("asked_by", default=None)


@contextlib.contextmanager
def asked_by(source: str):
    """Name what asked for the work inside this block (``"--hidden 65536 65536"``, ``"checkpoint r/best.npz"``)
    in any refusal raised there."""
    token = _ASKED_BY.set(source)
    try:
        yield
    finally:
        _ASKED_BY.reset(token)


def check(nbytes: int, what: str, hint: str, source: str | None = None) -> int:
    """Refuse ``what`` when it needs more than :func:`memory_limit` allows.

    Parameters
    ----------
    nbytes : int
        The estimate.
    what : str
        What needs it, e.g. ``"training conv-doc-dae on 4000x4000 images, 3 per batch"``.
    hint : str
        The smaller setting to try, e.g. ``"lower --batch-size"``.
    source : str, optional
        What asked for it; default: the innermost :func:`asked_by`.

    Returns
    -------
    int
        ``nbytes``.

    Raises
    ------
    MemoryRefused
        One line: ``{what} needs about N bytes (X GiB) ({source}), more than the L bytes (Y GiB) of
        {limit source}; {hint}``.
    """
    limit, where = memory_limit()
    if limit is not None and nbytes > limit:
        source = source or _ASKED_BY.get()
        by = f", asked for by {source}" if source else ""
        raise MemoryRefused(f"{what} needs about {nbytes:,} bytes ({human_bytes(nbytes)}){by}, more than the "
                            f"{limit:,} bytes ({human_bytes(limit)}) of {where}; {hint} (or set {ENV_LIMIT} to "
                            "allow more)")
    return nbytes


# ----------------------------------------------------------------------------- parameters


def parameter_bytes(scalars: int, itemsize: int, training: bool = True) -> int:
    """Values and gradients, and for training the optimizer's two moments (Adam's, the most any optimizer keeps)."""
    return (4 if training else 2) * int(scalars) * int(itemsize)


def check_parameters(scalars: int, itemsize: int) -> int:
    """Refuse a model of ``scalars`` parameters the machine cannot train (called before the buffers exist)."""
    return check(parameter_bytes(scalars, itemsize), f"a model of {scalars:,} parameters (values, gradients and "
                 "optimizer state)", "use fewer or smaller layers (--hidden, --latent-dim) or smaller images")


# ----------------------------------------------------------------------------- activations


def _layer_values(layer, in_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(output shape, values per example) of one layer or stack fed ``in_shape``."""
    from .layers import ConvTranspose2d, Sequential

    if isinstance(layer, Sequential):
        total = 0
        for inner in layer:
            in_shape, values = _layer_values(inner, in_shape)
            total += values
        return tuple(in_shape), total
    out = tuple(layer.output_shape(tuple(in_shape)))
    values = 2 * math.prod(out)  # the output and its gradient
    weight = layer.param_shapes().get("weight")
    if weight is not None and len(weight) == 4:  # im2col columns: one kernel's worth of inputs per pixel
        per_pixel = (weight[0] if isinstance(layer, ConvTranspose2d) else weight[1]) * weight[2] * weight[3]
        pixels = math.prod(in_shape[1:]) if isinstance(layer, ConvTranspose2d) else math.prod(out[1:])
        values += per_pixel * pixels
    return out, values


def activation_values(parts, inputs) -> int:
    """Values one example occupies while it passes through ``parts`` forward and backward.

    Parameters
    ----------
    parts : dict of name -> Layer
        A model's parts in forward order.
    inputs : list of shapes
        The shapes a part may be fed besides the previous part's output (the model's input, its
        latent code, its code with the labels): each part takes the first one it accepts.

    Returns
    -------
    int
        Values per example (times the dtype's itemsize for bytes).
    """
    total, previous = 0, None
    for part in parts.values():
        for shape in ([previous] if previous is not None else []) + [tuple(s) for s in inputs]:
            try:
                previous, values = _layer_values(part, shape)
            except (ValueError, TypeError):
                continue
            total += values
            break
    return total


def model_inputs(model) -> list[tuple[int, ...]]:
    """The shapes a model's parts read: its input, encoder input, code and code with labels."""
    shapes = [tuple(model.input_shape)]
    if getattr(model, "encoder_input_shape", None) is not None:  # a conditional model's input and labels
        shapes.append(tuple(model.encoder_input_shape))
    config = getattr(model, "config", None)
    for dim in (getattr(model, "decoder_input_dim", None), getattr(config, "latent_dim", None),
                getattr(model, "num_classes", None)):
        if isinstance(dim, int) and dim > 0:
            shapes.append((dim,))
    return shapes


def per_example_bytes(model) -> int:
    """Activation bytes one example takes through ``model`` (forward and backward)."""
    return activation_values(model.parts, model_inputs(model)) * model.dtype.itemsize


def check_batch(model, batch: int, what: str, hint: str, *, k: int = 1, training: bool = False,
                images: int = 0, source: str | None = None) -> int:
    """Refuse running ``batch`` examples (``k`` samples each) through ``model``, plus ``images`` decoded
    pictures, when the estimate passes the limit. Returns the estimate in bytes."""
    per_example = per_example_bytes(model)
    nbytes = (parameter_bytes(model.num_parameters, model.dtype.itemsize, training)
              + int(batch) * int(k) * per_example + int(images) * math.prod(model.input_shape) * 8)
    shape = "x".join(map(str, model.input_shape))
    per = f" ({human_bytes(per_example)} per example of shape {shape}" + (f", {k} samples each)" if k > 1 else ")")
    return check(nbytes, f"{what}{per}", hint, source)


def check_samples(k: int, batch: int, most: int, source: str | None) -> None:
    """Refuse ``k`` decoded samples for each of ``batch`` examples per step beyond ``most`` (the CLI's cap),
    whatever set them: flags, a ``--config`` file or a resumed checkpoint."""
    if int(k) * int(batch) > most:
        by = f" (asked for by {source})" if source else ""
        raise MemoryRefused(f"k {k} with batch size {batch} decodes {int(k) * int(batch):,} samples per step, more "
                            f"than {most:,}{by}; lower k or the batch size")


def flags_text(flags: dict) -> str:
    """``{"--hidden": [65536, 65536]}`` -> ``--hidden 65536 65536``: what asked, as the user typed it."""
    return " ".join(f"{flag} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                    for flag, v in flags.items())
