"""``npvae train``: a new run from the options (and ``--config``), or ``--resume`` of a saved one."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import numpy as np

from .. import backend, memory
from .common import MAX_SAMPLES_PER_PASS, CLIError, and_list
from .inputs import describe_source, load_data, prepare
from .options import given, model_knobs, train_knobs
from .recipes import apply_recipe, record_recipe

_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
_DEMO_EPOCHS = 50  # the demo set is 13x smaller than MNIST: more passes for the same number of steps


# ----------------------------------------------------------------------------- the model


def model_kwargs(args, preset: str) -> dict:
    """The model options given, as keyword arguments of ``preset``; one that it does not take is an error."""
    knobs = model_knobs()
    kw = {}
    for name, value in given(args, knobs).items():
        knob = knobs[name]
        if preset not in knob.presets:
            refusal = knob.refusals.get(preset)
            raise CLIError(f"{knob.flag} {refusal.format(preset=preset)}" if refusal
                           else f"{knob.flag} applies to --model {and_list(knob.presets)}")
        kw[name] = value
    return kw


def build_model_from_args(args, input_shape: tuple[int, ...], num_classes: int, seed: int):
    """The ``--model`` preset with the model options given, for data of ``input_shape``."""
    from ..models import MODELS, Conditional

    cls = MODELS[args.model]
    kw = model_kwargs(args, args.model)
    if issubclass(cls, Conditional):
        if num_classes < 1:
            raise CLIError(f"--model {args.model} learns p(x | y) and needs class labels; this data has none "
                           "(an .npz with an array 'y', or a built-in dataset)")
        kw["num_classes"] = num_classes
    return cls(input_shape=tuple(input_shape), dtype=np.dtype(args.dtype), seed=seed, **kw)


# ----------------------------------------------------------------------------- the settings of a new run


def _fits(value, hint) -> bool:
    """Whether a JSON value has the type of a TrainConfig field (true is no number; 1 is a float)."""
    for t in typing.get_args(hint) or (hint,):
        if t is type(None):
            ok = value is None
        elif t is bool:
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float) if t is float else t) and not isinstance(value, bool)
        if ok:
            return True
    return False


def read_train_settings(path) -> dict:
    """The training settings in a JSON file: an object of :class:`npvae.TrainConfig` fields (a checkpoint's
    ``train_config``), or an object holding one under ``"train_config"`` (``npvae info --json``'s).
    Unknown names and wrong types are one-line errors."""
    from ..checkpoint import parse_json, read_text
    from ..optim import OPTIMIZERS
    from ..train import TrainConfig

    settings = parse_json(read_text(path, CLIError, "--config"), CLIError, f"--config {path}")
    if isinstance(settings, dict) and isinstance(settings.get("train_config"), dict):
        settings = settings["train_config"]
    if not isinstance(settings, dict):
        raise CLIError(f"--config {path}: expected a JSON object of training settings, got {type(settings).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    unknown = [k for k in settings if k not in hints]
    if unknown:
        raise CLIError(f"--config {path}: unknown setting{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                       f"the settings are {', '.join(hints)}")
    for key, value in settings.items():
        if not _fits(value, hints[key]):
            words = " or ".join(_TYPE_WORDS[t] for t in typing.get_args(hints[key]) or (hints[key],))
            raise CLIError(f"--config {path}: {key} must be {words}, got {json.dumps(value)}")
    if "optimizer" in settings and settings["optimizer"] not in OPTIMIZERS:
        raise CLIError(f"--config {path}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {settings['optimizer']!r}")
    return settings


def new_run_config(args):
    """The TrainConfig of a new run, each setting from the first of: the options given, ``--config``,
    the preset's ``train_defaults``, TrainConfig's default. Returns it, and whether its epochs were set."""
    from ..models import MODELS
    from ..train import TrainConfig

    settings = read_train_settings(args.config) if args.config else {}
    flags = given(args, train_knobs())
    values = {**MODELS[args.model].train_defaults, **settings, **flags}
    config = TrainConfig(**values)
    config.validate()
    from_file = args.config and not {"k", "batch_size"} <= flags.keys()  # the file set k or the batch: name it
    memory.check_samples(config.k, config.batch_size, MAX_SAMPLES_PER_PASS, f"--config {args.config}" if from_file
                         else f"--k {config.k} --batch-size {config.batch_size}")
    return config, "epochs" in values


# ----------------------------------------------------------------------------- resuming


def _numbered(base: Path):
    """``base``, ``base-2``, ``base-3``, ...: the default run folders of one model and dataset."""
    yield base
    n = 2
    while True:
        yield base.with_name(f"{base.name}-{n}")
        n += 1


def free_run_dir(base: Path) -> Path:
    """A new run's default ``--out``: ``base``, else the first of ``base-2``, ``base-3``, ... that holds no
    other run (as Lightning's ``version_N`` or YOLO's ``exp2``): two trainings in a row never collide."""
    from ..rundir import run_outputs

    return next(out for out in _numbered(base) if not run_outputs(out))


def _resume_dir(args) -> Path:
    """The run directory --resume continues: --out, else the latest default one that holds a checkpoint."""
    from .. import data

    if args.out:
        return Path(args.out)
    names = [args.dataset] if args.dataset else [data.DEFAULT_DATASET, data.DEMO]
    candidates = [Path(f"runs/{args.model}-{name}") for name in names]
    for base in candidates:
        latest = None
        for out in _numbered(base):
            if not out.exists():
                break
            latest = out if (out / "checkpoint.npz").exists() else latest
        if latest is not None:
            return latest
    raise CLIError("--resume: no checkpoint in " + " or ".join(str(c) for c in candidates)
                   + "; pass --out DIR, the run directory to continue")


def _json_value(value):
    return list(value) if isinstance(value, tuple) else value


def _data_conflict(args, dest: str, run: dict, changed: dict) -> str | None:
    """Whether ``--dataset``, ``--data`` or ``--target`` names other data than the run's (moved data is
    recorded in ``changed``)."""
    value = getattr(args, dest)
    source = run.get("data_source") or {"kind": "builtin", "name": run.get("dataset")}
    if dest == "dataset":
        same = source.get("kind") == "builtin" and source.get("name") == value
        return None if same else f"--dataset {value} (the run trained on {describe_source(source)})"
    was = source.get("path" if dest == "data" else "target") if source.get("kind") == "path" else None
    if was is not None and Path(str(was)).resolve() == Path(value).resolve():
        return None
    if was is not None and not Path(str(was)).exists():  # the same data, moved
        changed[dest] = [was, value]
        return None
    return f"--{dest} {value} (the run trained on {describe_source(source)})"


def resume_settings(args, run: dict, explicit: set) -> tuple[dict, dict]:
    """The saved run's settings, with the explicit options a resume may change applied.

    Returns
    -------
    config : dict
        The TrainConfig fields to resume with.
    changed : dict of field -> [saved, new]
        What the explicit options changed (recorded in the log).

    Raises
    ------
    CLIError
        Listing every explicit option that contradicts the saved run.
    """
    saved = run.get("train_config")
    if not isinstance(saved, dict):
        raise CLIError("the checkpoint has no training settings to resume with")
    tknobs, mknobs, model_config = train_knobs(), model_knobs(), run.get("model_config") or {}
    config, changed, conflicts = dict(saved), {}, []
    for dest in sorted(explicit):
        value = getattr(args, dest, None)
        if dest in tknobs:
            knob, new = tknobs[dest], tknobs[dest].value(value)
            if config.get(dest) == new:
                continue
            if knob.resumable:
                config[dest] = new
                changed[dest] = [saved.get(dest), new]
            else:
                conflicts.append(f"{knob.flag} {value} (the run used {saved.get(dest)!r})")
        elif dest in mknobs:
            new = _json_value(mknobs[dest].value(value))
            if dest in model_config and model_config[dest] != new:
                conflicts.append(f"{mknobs[dest].flag} {value} (the model has {dest} = {model_config[dest]!r})")
        elif dest == "model" and value != run.get("model"):
            conflicts.append(f"--model {value} (the run trains a {run.get('model')})")
        elif dest == "dtype" and value != run.get("dtype"):
            conflicts.append(f"--dtype {value} (the model is {run.get('dtype')})")
        elif dest in ("dataset", "data", "target"):
            conflicts.append(_data_conflict(args, dest, run, changed))
    conflicts = [c for c in conflicts if c]
    if conflicts:
        may = ", ".join([k.flag for k in tknobs.values() if k.resumable] + ["--data-dir"])
        raise CLIError("--resume continues the run as it was set up; these flags contradict it:\n  "
                       + "\n  ".join(conflicts)
                       + f"\nDrop them (a resumed run may change {may}), or start a new run with another --out.")
    if "epochs" in changed and config["epochs"] < int(run.get("epoch", 0) or 0):
        raise CLIError(f"--epochs {config['epochs']}: the run has already trained {run.get('epoch')} epochs")
    return config, changed


def _resume(args):
    """The run to continue, its checkpoint read and checked once: (out, model, run metadata, config, changed)."""
    from ..checkpoint import load_checkpoint, npvae_member
    from ..models.saving import model_from_checkpoint
    from ..train import TrainConfig, check_run_meta

    out = _resume_dir(args)
    path = out / "checkpoint.npz"
    if not path.exists():
        raise CLIError(f"--resume: no checkpoint at {path}")
    arrays, run = load_checkpoint(path, npvae_member)
    check_run_meta(run, path)
    settings, changed = resume_settings(args, run, getattr(args, "explicit", set()))
    try:
        config = TrainConfig(**settings)
        config.validate()
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{path}: its training settings cannot be used: {exc}") from None
    memory.check_samples(config.k, config.batch_size, MAX_SAMPLES_PER_PASS, str(path))
    return out, model_from_checkpoint(arrays, run, path), run, config, changed


# ----------------------------------------------------------------------------- the command


def cmd_train(args) -> int:
    from ..train import Trainer

    if args.overwrite and args.resume:
        raise CLIError("--overwrite removes another run's outputs to start afresh; --resume continues that run")
    if args.config and args.resume:
        raise CLIError("--config sets up a new run; --resume continues a run with the settings it saved")
    if args.backend:  # the rule of NPVAE_BACKEND: numba without Numba warns and runs the NumPy kernels
        backend.request_backend(args.backend, f"--backend {args.backend}")
    recipe, departures = apply_recipe(args)  # fills what the options leave unset; before anything reads them
    if args.resume:
        out, model, run, config, changed = _resume(args)
    else:
        config, epochs_set = new_run_config(args)
        record_recipe(config, recipe, departures)
        model_kwargs(args, args.model)  # an option the preset does not take fails before any data loads
        run, changed = None, {}
    dataset = load_data(args, seed=config.seed, source=None if run is None else run.get("data_source"))
    limit = f"; training on its first {config.limit:,} examples (--limit)" if config.limit else ""
    print(f"data: {dataset.description}{limit}")
    asked = str(out / "checkpoint.npz") if run is not None else f"--config {args.config}" if args.config else None
    if run is None:
        if dataset.is_demo and not epochs_set:
            config.epochs = _DEMO_EPOCHS
        out = Path(args.out) if args.out else free_run_dir(Path(f"runs/{args.model}-{dataset.name}"))
        knobs = model_knobs()
        flags = {knobs[name].flag: value for name, value in given(args, knobs).items()}
        with memory.asked_by(memory.flags_text({"--model": args.model, **flags})):
            model = build_model_from_args(args, dataset.train_x.shape[1:], dataset.num_classes, config.seed)
    batch = max(min(config.batch_size, len(dataset.train_x)), min(config.eval_batch_size, len(dataset.val_x)))
    memory.check_batch(model, batch, f"training {model.kind} on batches of {batch}", "lower --batch-size (or train "
                       "on tiles of the images)", k=config.k, training=True, source=asked or "--batch-size / --k")
    print(f"model: {model!r}")
    if not config.training_objective().is_default:
        print(f"objective: {config.training_objective().describe()}")
    print(f"backend: {backend.get_backend()}; writing to {out}/")
    if changed:
        print("resuming with " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    trainer = Trainer(model, dataset, config, out, progress=not args.no_progress)
    trainer.resumed_changes = changed
    trainer.overwrite = args.overwrite
    result = trainer.run(resume=run is not None)
    if result.stopped == "interrupted":
        return 128 + int(result.signal or 2)
    _final_report(trainer, model, dataset, config, out)
    return 0


def _final_report(trainer, model, dataset, config, out: Path) -> None:
    """The trained model's loss on the test split (the validation split where there is none)."""
    from ..train import BEST, CHECKPOINT, LOG

    target = dataset.test_target
    x, y = prepare(dataset.test_x, model, config.binarize, config.seed), model.check_labels(dataset.test_y,
                                                                                           len(dataset.test_x))
    test = trainer.evaluate(x, y, np.random.default_rng([config.seed, 3]),
                            None if target is None else prepare(target, model, config.binarize, config.seed))
    split = ("validation (this data has no separate test split)" if dataset.is_demo or dataset.test_x is dataset.val_x
             else "test")
    print(f"{split}: {model.loss_names.format(test['loss'], test['recon'], test['reg'], se=test['se'])} per image "
          f"(± its standard error over the {len(dataset.test_x):,} images)")
    for line in _blank_model_notes(model, x, y, test, trainer.step):
        print(line)
    written = [name for name in (CHECKPOINT, BEST, LOG) if (out / name).exists()]
    print(f"wrote {out}/" + ", ".join(written + [p.name for p in trainer.pictures_written]))


COLLAPSED_KL = 0.5  # nats per image: below it the codes carry next to nothing about the image
UNIFORM_OUTPUTS = 0.1  # outputs' spread across images, as a share of the data's: below it the pictures look uniform


def _blank_model_notes(model, x, y, test: dict, steps: int) -> list[str]:
    """What a newcomer would otherwise only see in a grey picture: a KL near zero (the posterior collapsed
    onto the prior) or reconstructions that barely differ from one image to the next (too few steps)."""
    from ..models import GaussianLatent

    notes, advice = [], (f"after {steps:,} steps this usually means too few: train longer (more --epochs) or "
                         "with a smaller --batch-size")
    if isinstance(model, GaussianLatent) and test["reg"] < COLLAPSED_KL:
        notes.append(f"note: the KL is {test['reg']:.2f} nats per image: the codes carry almost nothing about the "
                     f"images (posterior collapse), so samples and the manifold will look alike; {advice}")
    rows = slice(0, 256)
    outputs = model.reconstruct(x[rows], None if y is None else y[rows])
    spread, data_spread = float(outputs.std(axis=0).mean()), float(x[rows].std(axis=0).mean())
    if data_spread > 0 and spread < UNIFORM_OUTPUTS * data_spread:
        notes.append(f"note: the reconstructions barely differ from one image to the next ({spread / data_spread:.0%} "
                     f"of the images' own spread): the pictures will look uniform; {advice}")
    return notes
