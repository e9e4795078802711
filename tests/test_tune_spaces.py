"""Search spaces: discovered by file name, define-by-run with Optuna, reference grids."""

from __future__ import annotations

import optuna
import pytest

from mttl.errors import ConfigError
from mttl.sweep import available_spaces, default_space_name, load_space

REFERENCE_LRS = {1e-3, 1e-4}
REFERENCE_ROUTING_LRS = {0.5, 0.1}


def test_every_finetune_type_has_a_space():
    assert set(SPACES) <= set(available_spaces())


SPACES = ["lora", "ia3", "poly", "poly_z", "mhr", "mhr_z", "mhr_mu", "full", "fresh_routed", "lora_fresh"]


@pytest.mark.parametrize("name", SPACES)
def test_space_is_define_by_run_and_searches_its_grid_keys(name):
    """Every space searches its grid's keys and at most config keys or the sweep's steps_fraction."""
    from mttl.config import Config
    from mttl.sweep import STEPS_FRACTION

    module = load_space(name)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(3):
        trial = study.ask()
        values = module.space(trial)
        assert set(trial.params) <= set(values)
        assert set(module.GRID[0]) <= set(values)
        assert set(values) - {STEPS_FRACTION} <= set(Config.field_names())
        assert all(v >= 0 for v in values.values()) and 0 < values.get(STEPS_FRACTION, 1) <= 1
        study.tell(trial, 0.0)


@pytest.mark.parametrize("total_steps,epochs,fraction,want", [
    (100, -1, 0.25, {"total_steps": 25}), (100, -1, 0.001, {"total_steps": 1}),
    (-1, 40, 0.5, {"num_train_epochs": 20}), (-1, -1, 0.5, {"total_steps": 500}),  # the few-shot default: 1000 steps
])
def test_steps_fraction_scales_the_configured_budget(total_steps, epochs, fraction, want):
    from mttl.config import Config
    from mttl.sweep import config_overrides

    base = Config().update({"total_steps": total_steps, "num_train_epochs": epochs})
    assert config_overrides({"learning_rate": 1e-3, "steps_fraction": fraction}, base) == {"learning_rate": 1e-3,
                                                                                            **want}
    assert config_overrides({"grid_point": {"learning_rate": 1e-4}}, base) == {"learning_rate": 1e-4}


def test_reference_grids():
    assert {(g["learning_rate"], g["module_logits_learning_rate"]) for g in load_space("mhr").GRID} == {
        (lr, mlr) for lr in REFERENCE_LRS for mlr in REFERENCE_ROUTING_LRS}
    assert [set(g) for g in load_space("mhr_z").GRID] == [{"module_logits_learning_rate"}] * 2
    assert {g["module_logits_learning_rate"] for g in load_space("poly_z").GRID} == REFERENCE_ROUTING_LRS
    for name in ("lora", "ia3", "full", "mhr_mu"):
        assert {g["learning_rate"] for g in load_space(name).GRID} == REFERENCE_LRS
    assert load_space("mhr_z").FINETUNE_TYPE == "Z"
    assert load_space("mhr_mu").FINETUNE_TYPE == "MuZ"


def test_a_new_file_is_a_new_space(tmp_path):
    path = tmp_path / "my_space.py"
    path.write_text("GRID = [{'learning_rate': 0.3}]\n"
                    "def space(trial):\n    return {'learning_rate': trial.suggest_float('learning_rate', 0.1, 0.5)}\n")
    module = load_space(str(path))
    assert module.GRID == [{"learning_rate": 0.3}]


def test_unknown_or_broken_space_is_a_user_error(tmp_path):
    with pytest.raises(ConfigError, match="tune_space 'nope'"):
        load_space("nope")
    bad = tmp_path / "bad.py"
    bad.write_text("GRID = []\n")
    with pytest.raises(ConfigError, match="space"):
        load_space(str(bad))


@pytest.mark.parametrize("finetune_type,modifier,n_splits,want", [
    ("Z", "poly", 1, "poly_z"), ("Z", "poly", 4, "mhr_z"), ("MuZ", "poly", 4, "mhr_mu"), (None, "poly", 4, "mhr"),
    (None, "poly", 1, "poly"), ("F", None, 1, "full"), ("A", "ia3", 1, "ia3"), (None, "lora", 1, "lora"),
    ("PolyRand", "poly", 4, "fresh_routed"), ("PolyRand", "lora", 1, "lora_fresh"), ("PolyRand", "ia3", 1, "ia3"),
])
def test_default_space_from_finetune_type_and_modifier(finetune_type, modifier, n_splits, want):
    from mttl.config import Config

    cfg = Config().update({"finetune_type": finetune_type, "model_modifier": modifier, "n_splits": n_splits})
    assert default_space_name(cfg) == want


def test_the_search_starts_from_the_grid_at_full_steps(tmp_path):
    """search_starts_from_grid: TPE's first trials are GRID's points in order, every searched key fixed
    (steps_fraction at 1: the grid's configured steps); off, none; a GRID key the space does not
    search would be dropped from those trials, so it is refused."""
    from mttl.config import Config
    from mttl.sweep import start_points

    cfg = Config().update({"num_samples": 8})
    assert start_points(cfg, "mhr") == [{**point, "steps_fraction": 1.0} for point in load_space("mhr").GRID]
    assert start_points(cfg.copy(num_samples=3), "mhr") == start_points(cfg, "mhr")[:3]
    assert start_points(cfg.copy(search_starts_from_grid=False), "mhr") == []
    space = tmp_path / "narrow.py"
    space.write_text("GRID = [{'learning_rate': 0.1, 'warmup_steps': 3}]\n"
                     "def space(trial):\n    return {'learning_rate': trial.suggest_float('learning_rate', 0.01, 1)}\n")
    with pytest.raises(ConfigError, match=r"GRID key\(s\) \['warmup_steps'\] are not searched"):
        start_points(cfg, str(space))
