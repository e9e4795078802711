"""The finetune-type table is the one source the config, the CLI help, the sweep and fine-tuning read:
every row is an allowed `finetune_type`, shows in `mttl finetune --help`, names a search space
that exists, and sets the trainable regex fine-tuning applies (no model is built here)."""

from __future__ import annotations

import pytest

from mttl.config import Config
from mttl.errors import ConfigError
from mttl.cli.finetune import DESCRIPTION, HELP
from mttl.finetune.type_table import DEFAULT_TYPE, FINETUNE_TYPES, finetune_type
from mttl.finetune.types import finetune_config
from mttl.sweep import available_spaces, default_space_name, load_space

MODELS = [("poly", 1), ("poly", 4), ("lora", 1), ("ia3", 1), (None, 1)]


def test_config_accepts_exactly_the_table_and_none():
    choices = [f for f in Config.__dataclass_fields__.values() if f.name == "finetune_type"][0].metadata["choices"]
    assert choices == [None, *FINETUNE_TYPES]
    assert Config().update({"finetune_type": None}).finetune_type is None
    with pytest.raises(ConfigError, match="finetune_type.*one of"):
        Config().update({"finetune_type": "Y"})
    assert finetune_type(None) is FINETUNE_TYPES[DEFAULT_TYPE]


@pytest.mark.parametrize("name", list(FINETUNE_TYPES))
def test_every_type_is_documented_in_config_and_cli_help(name):
    row = FINETUNE_TYPES[name]
    assert Config().update({"finetune_type": name}).finetune_type == name
    assert f"{name} ({row.help})" in Config.help_for("finetune_type")
    assert name in HELP
    assert any(line.split()[:1] == [name] and row.trains in line and row.starting_point in line
               for line in DESCRIPTION.splitlines())


@pytest.mark.parametrize("name", list(FINETUNE_TYPES))
@pytest.mark.parametrize("modifier,n_splits", MODELS)
def test_every_type_has_an_existing_default_space(name, modifier, n_splits):
    cfg = Config().update({"finetune_type": name, "model_modifier": modifier, "n_splits": n_splits})
    space = default_space_name(cfg)
    assert space == FINETUNE_TYPES[name].default_space(modifier, n_splits)
    assert space in available_spaces()
    declared = getattr(load_space(space), "FINETUNE_TYPE", None)
    # a space that fixes a type fixes this one (adapter spaces are shared by A, PolyRand and Poly)
    assert declared in (None, name) or name in ("A", "PolyRand", DEFAULT_TYPE)


@pytest.mark.parametrize("name", list(FINETUNE_TYPES))
def test_finetune_config_applies_the_types_trainable_regex(name):
    routed_run = Config().update({"model_modifier": "poly", "n_splits": 2, "trainable_param_names": ".*lora.*"})
    lora_run = Config().update({"model_modifier": "lora", "trainable_param_names": ".*lora.*"})
    row = FINETUNE_TYPES[name]
    run = lora_run if name == "A" else routed_run
    merged = finetune_config(run, Config().update({"finetune_type": name, "checkpoint": "ckpt"}))
    assert merged.trainable_param_names == (row.trainable_param_names or ".*lora.*")
    # the user's own regex wins over the type's
    mine = finetune_config(run, Config().update({"finetune_type": name, "checkpoint": "ckpt",
                                                 "trainable_param_names": ".*mine.*"}))
    assert mine.trainable_param_names == ".*mine.*"


@pytest.mark.parametrize("name", [n for n, row in FINETUNE_TYPES.items() if row.needs_routed_checkpoint])
def test_types_that_need_routing_refuse_an_unrouted_checkpoint(name):
    with pytest.raises(ConfigError, match=f"finetune_type={name} needs a routed checkpoint"):
        finetune_config(Config().update({"model_modifier": "lora"}),
                        Config().update({"finetune_type": name, "checkpoint": "ckpt"}))
