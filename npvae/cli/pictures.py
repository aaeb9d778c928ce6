"""``npvae sample``, ``npvae reconstruct`` and ``npvae plot WHAT`` (a dispatcher over
:data:`npvae.viz.figures.FIGURES`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import memory
from .common import MAX_PICTURE_IMAGES, CLIError, conditional_presets, load_model, near_zero, output_path
from .inputs import dataset_for, prepare, split_data, split_target


def _check_label(model, label, checkpoint) -> None:
    from ..models import Conditional

    if not isinstance(model, Conditional):
        raise CLIError(f"--label needs a conditional model ({conditional_presets()}); {checkpoint} holds a "
                       f"{model.kind}")
    try:
        model.check_labels(np.array([label]))
    except ValueError as exc:
        raise CLIError(f"--label {label}: {exc}") from None


def cmd_sample(args) -> int:
    from ..viz import figures

    out = output_path(args, "samples.png")
    model, _ = load_model(args.checkpoint)
    rng = np.random.default_rng(args.seed)
    if args.label is not None:
        _check_label(model, args.label, args.checkpoint)
    memory.check_batch(model, args.n, f"decoding {args.n} samples", "lower --n", images=args.n,
                       source=f"--n {args.n} with {args.checkpoint}")
    if model.prior_name is None:
        print(f"{model.kind} has no prior: these are decoded N(0, I) codes, not samples of the data")
    print(f"wrote {figures.samples(model, out, rng, n=args.n, label=args.label)}")
    return 0


def cmd_reconstruct(args) -> int:
    from ..viz import figures

    model, meta = load_model(args.checkpoint)
    memory.check_batch(model, args.n, f"reconstructing {args.n} images", "lower --n", images=3 * args.n,
                       source=f"--n {args.n} with {args.checkpoint}")
    dataset = dataset_for(args, meta, "test")
    tc = meta.get("train_config", {})
    x = prepare(dataset.test_x[: args.n], model, tc.get("binarize", "none"), tc.get("seed", 0))
    labels = None if dataset.test_y is None else dataset.test_y[: args.n]
    target = split_target(dataset, "test", model, meta, args.n)
    path = figures.reconstructions(model, x, output_path(args, "reconstructions.png"),
                                   model.check_labels(labels, len(x)), n=args.n, target=target)
    print(f"wrote {path}")
    return 0


def _run_log(checkpoint) -> Path:
    from ..viz.figures import FIGURES

    log = Path(checkpoint).parent / "log.jsonl"
    if not log.is_file():
        readers = " and ".join(FIGURES.where(lambda f: f.needs_log))
        raise CLIError(f"no training log at {log}: {readers} read the log.jsonl that training writes beside its "
                       "checkpoints")
    return log


def _check_plot(args, figure, model, n) -> None:
    """The figure's needs and the picture's size, checked before anything is drawn."""
    from ..models import Conditional
    from ..viz.figures import FIGURES

    if args.label is not None and "label" not in figure.options:
        readers = " and ".join(FIGURES.where(lambda f: "label" in f.options))
        raise CLIError(f"--label applies to {readers}, not {figure.name}")
    if args.label is not None:
        _check_label(model, args.label, args.checkpoint)
    if figure.needs_conditional and not isinstance(model, Conditional):
        raise CLIError(f"{figure.name} needs a conditional model ({conditional_presets()}); {args.checkpoint} "
                       f"holds a {model.kind}")
    images = figure.images(n or 0, args.steps, model)
    if images > MAX_PICTURE_IMAGES:
        raise CLIError(f"{figure.name} with --n {n} would draw {images:,} images; one picture holds at most "
                       f"{MAX_PICTURE_IMAGES:,}")
    memory.check_batch(model, max(images, 1), f"drawing {figure.name} ({images:,} images)", "lower --n",
                       images=images, source=f"plot {figure.name} with {args.checkpoint}")


def cmd_plot(args) -> int:
    from ..viz.figures import FIGURES, FigureInput, class_names

    figure = FIGURES[args.what]
    log = _run_log(args.checkpoint) if figure.needs_log else None
    model, meta = load_model(args.checkpoint)
    n = args.n if args.n is not None else figure.default_n
    _check_plot(args, figure, model, n)
    given = {"model": model, "out": output_path(args, f"{figure.name}.png"), "rng": np.random.default_rng(args.seed),
             "n": n, "steps": args.steps, "label": args.label, "threshold": args.threshold, "split": args.split,
             "near_zero": near_zero(args), "dataset_name": meta.get("dataset"), "log": log}
    if figure.needs_images:
        dataset, x, y, _ = split_data(args, model, meta)
        given.update(x=x, y=y, dataset_name=dataset.name,
                     class_names=class_names(dataset.name, dataset.num_classes) if dataset.has_labels else None,
                     target=split_target(dataset, args.split, model, meta, n))
    path, lines = figure.draw(FigureInput(**given))
    for line in lines:
        print(line)
    print(f"wrote {path}")
    return 0
