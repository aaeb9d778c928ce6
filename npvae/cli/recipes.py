"""``npvae recipes`` (the write-ups' systems, :data:`npvae.recipes.RECIPES`) and ``npvae train --recipe``.

``--recipe NAME`` fills every option the user did not give from the recipe: the model preset and its
options, the training settings, the data. Options given beside it override the recipe and are printed
as departures from the write-up, and the run records the recipe's name and the departures in its
``train_config`` (``npvae info`` shows them).
"""

from __future__ import annotations

import dataclasses
import textwrap

from .common import CLIError
from .options import _UNSET, model_knobs, train_knobs

# Settings that say how npvae runs, not what it trains: giving them departs from no write-up.
_BOOKKEEPING = {"seed", "pictures", "log_grad_norms"}


def add_recipe_arg(parser) -> None:
    """``npvae train --recipe NAME``."""
    from ..recipes import RECIPES

    parser.add_argument("--recipe", choices=tuple(RECIPES), default=None, metavar="NAME",
                        help="train a write-up's system as the write-up does: its model, loss, optimizer, batch, "
                             "epochs, noise and data (npvae recipes lists them); options given override it and "
                             f"are reported as departures. One of {', '.join(RECIPES)}")


def _flag_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value)) or "(none)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def apply_recipe(args):
    """Fill the options ``args`` leaves unset from ``args.recipe``; return ``(recipe, departures)``, the
    departures as printed (``--epochs 1 (the write-up trains 20)``), or ``(None, [])`` without --recipe."""
    from ..data import dataset_title
    from ..models import MODELS
    from ..recipes import RECIPES

    if not getattr(args, "recipe", None):
        return None, []
    recipe = RECIPES[args.recipe]
    explicit = getattr(args, "explicit", set())
    if args.resume:
        raise CLIError("--resume continues a run with the settings it saved (its recipe included); drop --recipe")
    if args.config:
        raise CLIError(f"--recipe {recipe.name} sets the training settings, and so does --config; pass one (and "
                       "options for what should differ)")
    if "model" in explicit and args.model != recipe.model:
        raise CLIError(f"--recipe {recipe.name} trains --model {recipe.model}; --model {args.model} is another "
                       "system (drop --recipe, or --model)")
    args.model = recipe.model
    departures = []
    mknobs, tknobs = model_knobs(), train_knobs()
    preset_defaults = {f.name: f.default for f in dataclasses.fields(MODELS[recipe.model].config_class)}
    for name, value in recipe.model_config.items():
        if name not in mknobs or recipe.model not in mknobs[name].presets:
            raise CLIError(f"recipe {recipe.name}: {name} is not an option of --model {recipe.model}")
        if name not in explicit:
            setattr(args, name, value)
    for name, knob in mknobs.items():
        if name in explicit and recipe.model in knob.presets:
            given = knob.value(getattr(args, name))
            wanted = recipe.model_config.get(name, preset_defaults.get(name))
            if given != wanted:
                departures.append(f"{knob.flag} {_flag_value(given)} (the write-up's: {_flag_value(wanted)})")
    settings = recipe.train_settings()
    for name, value in settings.items():
        knob = tknobs[name]
        if name in explicit:
            continue
        if value is not None:
            setattr(args, name, value)
        elif knob.none_as is not _UNSET:  # the flag value that means None (--patience 0: never stop)
            setattr(args, name, knob.none_as)
    from ..train import TrainConfig

    defaults = TrainConfig()
    for name, knob in tknobs.items():
        if name in explicit and name not in _BOOKKEEPING:
            given = knob.value(getattr(args, name))
            wanted = settings.get(name, getattr(defaults, name))
            if given != wanted:
                said = "the write-up trains" if name == "epochs" else "the write-up's:"
                departures.append(f"{knob.flag} {_flag_value(given)} ({said} {_flag_value(wanted)})")
    if not (args.dataset or args.data):
        if recipe.dataset is None:
            raise CLIError(f"--recipe {recipe.name} trains on your data: {recipe.data}")
        args.dataset = recipe.dataset
    elif recipe.dataset is not None and (args.data or args.dataset != recipe.dataset):
        given = f"--dataset {args.dataset}" if args.dataset else f"--data {args.data}"
        departures.append(f"{given} (the write-up's: {dataset_title(recipe.dataset)})")
    for line in departures:
        print(f"departing from {recipe.name}: {line}")
    return recipe, departures


def record_recipe(config, recipe, departures) -> None:
    """Write the recipe's name and the departures into a new run's TrainConfig (saved with every checkpoint);
    a run without --recipe follows none, even when its --config came from one that did."""
    config.recipe = None if recipe is None else recipe.name
    config.departures = "; ".join(departures) or None


def _rows_text(rows) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(textwrap.fill(text, 110, initial_indent=f"  {label:<{width}}  ",
                                   subsequent_indent=" " * (width + 4)) for label, text in rows)


def cmd_recipes(args) -> int:
    from ..recipes import RECIPES

    if args.name is None:
        for recipe in RECIPES.values():
            config = recipe.train_config()
            print(f"{recipe.name}: {recipe.writeup}, {recipe.section}")
            print(_rows_text([("network", f"--model {recipe.model}"
                                          + (f", {recipe.parameters:,} parameters" if recipe.parameters else
                                             " (the write-up gives no network)")),
                              ("loss", recipe.loss), ("optimizer", recipe.optimizer_text()),
                              ("batch, epochs", f"{config.batch_size}, {config.epochs}")]))
        print("\nnpvae recipes NAME shows one in full; npvae train --recipe NAME trains it.")
        return 0
    recipe = RECIPES[args.name]
    print(f"{recipe.name}")
    print(_rows_text(recipe.rows()))
    print("\nhow the write-up's loss and settings become npvae's:")
    print("\n".join("  " + line for line in recipe.derivation.splitlines()))
    if recipe.differs:
        print("\nwhat differs from the write-up, and why:")
        print("\n".join(textwrap.fill(text, 110, initial_indent="  - ", subsequent_indent="    ")
                        for text in recipe.differs))
    print(f"\nnpvae train --recipe {recipe.name}" + ("" if recipe.dataset else " --data NOISY_DIR --target CLEAN_DIR"))
    return 0


def add_recipes_command(sub) -> None:
    from ..recipes import RECIPES

    p = sub.add_parser("recipes", help="the write-ups' systems as they train them (npvae train --recipe NAME)",
                       description="List the recipes: one per write-up system, with the write-up it follows, its "
                                   "network, loss, optimizer, batch and epochs; with NAME, one recipe in full, with "
                                   "how its loss maps to npvae's and what differs from the write-up.")
    # checked by the registry (not argparse's choices, which would also check the absent NAME's default)
    p.add_argument("name", nargs="?", metavar="NAME", help=f"one recipe: {', '.join(RECIPES)}")
    p.set_defaults(func=cmd_recipes)
