"""Tests of the estimator registry's training table: what trains which bound, and what the command line
offers, both derived from the entries (the estimators' gradients are tested in tests/study/test_estimators.py)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from npvae.cli import build_parser
from npvae.objectives import BOUNDS, ESTIMATORS, TRAINING_OBJECTIVES, Estimator, Objective, estimator_help, trainable
from npvae.objectives.estimators import reparameterization
from npvae.train import TrainConfig


def test_the_training_table_is_what_each_entry_says_it_trains():
    assert TRAINING_OBJECTIVES == {"elbo": ("reparam", "stl"), "iwae": ("reparam", "stl", "dreg")}
    assert trainable() == ("reparam", "stl", "dreg")
    for bound in BOUNDS:
        for name, entry in ESTIMATORS.items():
            accepted = name in TRAINING_OBJECTIVES[bound]
            assert accepted == (bound in entry.trains)
            if not accepted:
                with pytest.raises(ValueError, match=f"does not train objective '{bound}'"):
                    Objective(bound, 2, name)


def test_every_entry_explains_itself_and_every_training_estimator_trains_from_one_draw_per_example():
    assert all(entry.help and entry.label for entry in ESTIMATORS.values())
    for name in trainable():
        entry = ESTIMATORS[name]
        assert not entry.pools_draws and all(b in entry.objectives for b in entry.trains)
    assert not ESTIMATORS["stl"].is_unbiased("iwae") and ESTIMATORS["dreg"].is_unbiased("iwae")


def test_the_command_line_offers_the_registry_s_training_estimators_with_their_help():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    action = next(a for a in train._actions if a.dest == "estimator")
    assert tuple(action.choices) == trainable() and TrainConfig().estimator == Objective().estimator
    assert action.help == estimator_help()
    for name in trainable():
        assert f"{name} ({ESTIMATORS[name].help})" in action.help
    objective = next(a for a in train._actions if a.dest == "objective")
    assert tuple(objective.choices) == tuple(BOUNDS)


def test_an_entry_that_contradicts_itself_is_refused():
    with pytest.raises(ValueError, match="trains \\['iwae'\\] but does not estimate their gradient"):
        Estimator("x", "x", reparameterization, objectives=("elbo",), trains=("iwae",))
    with pytest.raises(ValueError, match="trains \\['vimco'\\] are not among elbo, iwae"):
        Estimator("x", "x", reparameterization, trains=("vimco",))
    with pytest.raises(ValueError, match="pools draws of one example"):
        Estimator("x", "x", reparameterization, pools_draws=True, trains=("elbo",))


def test_a_run_s_config_names_its_objective_and_old_runs_read_as_the_default():
    assert Objective.from_config({}) == Objective() and Objective().is_default
    assert Objective.from_config({"objective": "iwae", "k": 5, "estimator": "dreg"}) == Objective("iwae", 5, "dreg")
    assert not Objective("elbo", 1, "stl").is_default
    with pytest.raises(ValueError, match="k >= 1"):
        Objective.from_config({"objective": "iwae", "k": np.int64(0)})
