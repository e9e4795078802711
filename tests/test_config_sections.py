"""Configuration sections: every key in exactly one section, the adapters section is `AdapterConfig`'s
own fields, and sectioned config files load as their flat form does."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from mttl.adapters.config import AdapterConfig
from mttl.cli import main
from mttl.config import SECTIONS, Config, load_config
from mttl.errors import ConfigError

# the run-config key of each AdapterConfig field, written out here to check the field metadata
ADAPTER_KEYS = {
    "modifier": "model_modifier", "rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout",
    "n_skills": "n_skills", "n_splits": "n_splits", "n_tasks": "n_tasks", "selector": "router_selector",
    "granularity": "router_granularity", "relaxed_bernoulli": "module_logits_relaxed_bernoulli",
    "straight_through": "module_logits_straight_through", "shared_skill": "poly_use_shared_skill",
    "average_correction": "poly_average_correction", "logits_dropout": "module_logits_dropout",
    "l2_norm": "module_logits_l2_norm", "randb_init": "lora_randb_init", "kaiming_init": "lora_kaiming_init",
    "warmup": "lora_warmup", "modify_modules": "modify_modules", "modify_layers": "modify_layers",
    "trainable_param_names": "trainable_param_names", "non_trainable_param_names": "non_trainable_param_names",
    "arrow_top_k": "arrow_top_k", "arrow_temperature": "arrow_temperature",
}


def test_every_key_is_in_exactly_one_section():
    names = [f.name for section in SECTIONS.values() for f in fields(section)]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(Config.field_names())
    assert list(SECTIONS) == ["run", "data", "model", "adapters", "training", "finetune", "search", "cluster"]
    assert Config.section_of("learning_rate") == "training" and Config.section_of("lora_layers") == "adapters"


def test_adapters_section_is_built_from_adapter_config():
    assert {f.name: f.metadata["key"] for f in fields(AdapterConfig)} == ADAPTER_KEYS
    section = {f.name: f for f in fields(SECTIONS["adapters"])}
    assert list(section) == list(ADAPTER_KEYS.values())
    defaults = AdapterConfig()
    for field_name, key in ADAPTER_KEYS.items():
        source = AdapterConfig.__dataclass_fields__[field_name]
        assert section[key].metadata["help"] == source.metadata["help"] == Config.help_for(key)
        assert section[key].metadata["choices"] == source.metadata["choices"]
        if key != "n_tasks":  # the run config leaves it unset until the data sets it
            assert getattr(Config(), key) == getattr(defaults, field_name), key
    assert Config().n_tasks is None and defaults.n_tasks == 1


def test_adapter_config_reads_every_run_key():
    values = {"model_modifier": "poly", "lora_rank": 3, "lora_alpha": 2.0, "lora_dropout": 0.1, "n_skills": 5,
              "n_splits": 2, "n_tasks": 7, "router_selector": "average", "router_granularity": "blockwise",
              "module_logits_relaxed_bernoulli": False, "module_logits_straight_through": True,
              "poly_use_shared_skill": True, "poly_average_correction": True, "module_logits_dropout": 0.2,
              "module_logits_l2_norm": True, "lora_randb_init": True, "lora_kaiming_init": True, "lora_warmup": True,
              "modify_modules": ".*Attn", "modify_layers": "q", "trainable_param_names": ".*lora.*",
              "non_trainable_param_names": ".*norm.*", "arrow_top_k": 2, "arrow_temperature": 0.5}
    acfg = AdapterConfig.from_config(Config().update(values))
    assert {field_name: getattr(acfg, field_name) for field_name in ADAPTER_KEYS} == {
        field_name: values[key] for field_name, key in ADAPTER_KEYS.items()}
    assert AdapterConfig.from_config(Config()).n_tasks == 1


def test_adapter_config_checks_the_allowed_values_of_its_fields():
    with pytest.raises(ConfigError, match=r"router_granularity must be one of \['finegrained'"):
        AdapterConfig(granularity="nope")
    with pytest.raises(ConfigError, match=r"model_modifier must be one of .* or None, got 'x'"):
        AdapterConfig(modifier="x")


def test_sectioned_and_flat_files_load_the_same(tmp_path):
    flat = {"learning_rate": 0.5, "lora_layers": "q|v", "model": "tiny-t5", "search": "grid", "num_workers": 2}
    sectioned = {"training": {"learning_rate": 0.5}, "adapters": {"lora_layers": "q|v"}, "model": {"model": "tiny-t5"},
                 "search": {"search": "grid"}, "num_workers": 2}
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    (tmp_path / "sectioned.json").write_text(json.dumps(sectioned))
    a, b = load_config(str(tmp_path / "flat.json")), load_config(str(tmp_path / "sectioned.json"))
    assert a == b and a.overridden_dict() == b.overridden_dict()
    assert b.learning_rate == 0.5 and b.modify_layers == "q|v" and b.model == "tiny-t5" and b.search == "grid"


def test_sectioned_dict_round_trips_and_saved_configs_stay_flat(tmp_path):
    cfg = load_config(None, ["lora_rank=3", "learning_rate=0.2", "seeds=[1]"])
    nested = cfg.to_dict(sectioned=True)
    assert nested["adapters"]["lora_rank"] == 3 and nested["training"]["learning_rate"] == 0.2
    assert {k: v for section in nested.values() for k, v in section.items()} == cfg.to_dict()
    assert cfg.section("finetune").seeds == [1] and type(cfg.section("finetune")).__name__ == "FinetuneSection"
    (tmp_path / "nested.json").write_text(json.dumps(nested))
    assert load_config(str(tmp_path / "nested.json")).to_dict() == cfg.to_dict()
    saved = json.loads(cfg.save(tmp_path / "run").read_text())
    assert saved["lora_rank"] == 3 and "adapters" not in saved
    (tmp_path / "run" / "config.json").write_text(json.dumps({**nested, "_overridden": ["lora_rank"]}))
    back = Config.load(tmp_path / "run" / "config.json")
    assert back.lora_rank == 3 and back.was_overridden("lora_rank") and not back.was_overridden("learning_rate")


@pytest.mark.parametrize("data,message", [
    ({"training": {"lora_rank": 3}}, "'lora_rank' .*belongs to section 'adapters', not 'training'"),
    ({"training": {"learning_rat": 3}}, "did you mean 'learning_rate'"),
    ({"training": 3}, "section 'training' .*must be an object"),
    ({"learning_rate": 1, "training": {"learning_rate": 2}}, "'learning_rate' .*given twice"),
])
def test_bad_sectioned_files_name_the_key(tmp_path, data, message, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))
    assert main(["configs", "-c", str(path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_configs_show_prints_sections(capsys):
    assert main(["configs", "-k", "lora_rank=2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown) == list(SECTIONS) and shown["adapters"]["lora_rank"] == 2
