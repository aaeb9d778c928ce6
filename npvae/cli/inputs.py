"""Loading a command's input: the run's data found again (or ``--data``), split and prepared as the run
prepared it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import CLIError


def prepare(images, model, binarize, seed):
    """Images as the run prepared its test data, viewed in the model's shape ((N, 28, 28) images for a
    (784,) model: a command-line user cannot reshape)."""
    from ..train import prepare_split

    return model.check_input(prepare_split(images, model, binarize, seed + 2))


def load_data(args, seed: int, source: dict | None = None, splits=("train", "test")):
    """The dataset of ``--data`` (a user's file or folder, with ``--target``), else a built-in one; a run's
    remembered ``source`` when neither is given. ``splits="test"``: of a built-in dataset only its test
    split is read (and needed on disk)."""
    from .. import data

    path, target = getattr(args, "data", None), getattr(args, "target", None)
    if path is None and not args.dataset and isinstance(source, dict) and source.get("kind") == "path":
        try:
            return data.load_path(source.get("path"), source.get("target"), seed=seed)
        except data.DataFileError as exc:
            raise CLIError(f"{exc} (where the run's data was; pass --data PATH to point elsewhere)") from None
    if path is not None:
        return data.load_path(path, target, seed=seed)
    if target is not None:
        raise CLIError("--target pairs a folder of targets with --data DIR; pass --data too")
    remembered = source if isinstance(source, dict) and source.get("kind") == "builtin" else {}
    name = args.dataset or remembered.get("name")
    data_dir = args.data_dir or (remembered.get("data_dir") if name == remembered.get("name") else None)
    if data_dir is not None and not args.data_dir and name in data.DATASETS:
        # The run's folder, remembered: when it has moved, say where npvae looked rather than download.
        if data.find_dataset_dir(name, data_dir, splits) is None:
            raise CLIError(f"the run's {data.dataset_title(name)} files are no longer in {data_dir} (nor in "
                           f"$NPVAE_DATA_DIR or {data.cache_dir()}); pass --data-dir DIR to point to where they are now")
    if name in data.DATASETS:
        return data.load_dataset(name, data_dir=data_dir, seed=seed, splits=splits)
    return data.load_dataset(name, data_dir=data_dir, seed=seed)


def dataset_for(args, meta, splits=("train", "test")):
    """The run's data (or the data the flags name); ``splits="test"`` for a command that reads only the
    test split: with only MNIST's t10k files on disk, a model can still be scored on the official test set."""
    source = meta.get("data_source") or {"kind": "builtin", "name": meta.get("dataset")}
    return load_data(args, meta.get("train_config", {}).get("seed", 0), source, splits)


def split_arrays(dataset, split: str):
    """The images, labels and paired targets of ``split``: test, val, or all (every example of a
    held-out ``--data``: its training and validation parts)."""
    if split != "all":
        return tuple(getattr(dataset, f"{split}_{a}") for a in ("x", "y", "target"))
    joined = [(getattr(dataset, f"train_{a}"), getattr(dataset, f"val_{a}")) for a in ("x", "y", "target")]
    return tuple(None if t is None else np.concatenate([t, v]) for t, v in joined)


def check_held_out(args, meta) -> None:
    """``--split all`` scores every example of ``--data``, so that data must be new to the run."""
    if args.split != "all":
        return
    if getattr(args, "data", None) is None:
        raise CLIError("--split all evaluates every example of held-out data: pass --data PATH (and --target DIR "
                       "for a paired run); the run's own data holds the images it trained on")
    source = meta.get("data_source") or {}
    if source.get("kind") == "path" and source.get("path") and \
            Path(args.data).expanduser().resolve() == Path(source["path"]).resolve():
        raise CLIError(f"--split all evaluates every example of --data, but {args.data} is the data the run trained "
                       "on; pass held-out data, or --split test for its validation part")


def split_target(dataset, split: str, model, meta, n: int | None = None):
    """The paired targets of ``split`` (first ``n``), prepared as the run's final test report prepared
    them; None when the run reconstructed its inputs (no ``--target``)."""
    target = split_arrays(dataset, split)[2]
    if target is None:
        return None
    tc = meta.get("train_config", {})
    return prepare(target if n is None else target[:n], model, tc.get("binarize", "none"), tc.get("seed", 0))


def split_data(args, model, meta, n: int | None = None, fresh_binarization: bool = False):
    """The images of ``args.split`` (first ``n``), prepared as the run prepared its data.

    Returns
    -------
    dataset, x (N, D) floats, y (N,) labels, note : str or None
        ``note`` says how binary runs' images were binarized.
    """
    from .. import data

    dataset = dataset_for(args, meta, "test" if args.split == "test" else ("train", "test"))
    tc = meta.get("train_config", {})
    images, labels, _ = split_arrays(dataset, args.split)
    if n is not None:
        images, labels = images[:n], None if labels is None else labels[:n]
    binarize = tc.get("binarize", "none")
    note = None
    if binarize != "none" and fresh_binarization:
        x = model.check_input(data.binarize_static(data.to_model_range(images, (0.0, 1.0), model.dtype),
                                                   np.random.default_rng([args.seed, 17])))
        note = (f"the run trained on binarized digits ({binarize}); these images are a fresh Bernoulli draw "
                f"(pixel intensity = probability of 1) from --seed {args.seed}")
    elif binarize != "none":
        x = prepare(images, model, binarize, tc.get("seed", 0))
        note = (f"the run trained on binarized digits ({binarize}); these images are one Bernoulli draw "
                "(pixel intensity = probability of 1) seeded by the run's seed, the draw its final test "
                "report used (--fresh-binarization draws another)")
    else:
        x = prepare(images, model, binarize, tc.get("seed", 0))
    return dataset, x, labels, note


def describe_source(source: dict) -> str:
    """A run's data as the flags that name it."""
    if source.get("kind") == "path":
        return f"--data {source.get('path')}" + (f" --target {source['target']}" if source.get("target") else "")
    return f"--dataset {source.get('name')}"
