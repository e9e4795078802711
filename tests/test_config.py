"""Config merging, literal parsing, aliases, env defaults, errors and the CLI's one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mttl.cli import main
from mttl.config import Config, load_config, parse_literal
from mttl.errors import ConfigError


def write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def test_literals_are_parsed_and_unparsable_values_stay_strings():
    assert parse_literal("1e-3") == 1e-3
    assert parse_literal("True") is True
    assert parse_literal("20_000") == 20000
    assert parse_literal("[1,2]") == [1, 2]
    assert parse_literal(".*lora_[ab].*") == ".*lora_[ab].*"
    assert parse_literal("t5-small") == "t5-small"


def test_files_merge_left_to_right_and_k_wins(tmp_path):
    a = write(tmp_path / "a.json", {"learning_rate": 0.1, "n_skills": 4, "lora_rank": 2})
    b = write(tmp_path / "b.json", {"learning_rate": 0.2, "n_splits": 2})
    cfg = load_config(f"{a}+{b}", ["lora_rank=8", "seeds=[1,2]"])
    assert cfg.learning_rate == 0.2          # later file wins
    assert cfg.n_skills == 4                 # from the first file
    assert cfg.n_splits == 2
    assert cfg.lora_rank == 8                # -k wins over files
    assert cfg.seeds == [1, 2]
    assert cfg.was_overridden("learning_rate") and cfg.was_overridden("lora_rank")
    assert not cfg.was_overridden("weight_decay") and cfg.was_default("weight_decay")


def test_config_names_are_looked_up_in_config_folders(tmp_path, monkeypatch):
    (tmp_path / "ni").mkdir()
    write(tmp_path / "ni" / "mine.json", {"lora_rank": 3})
    monkeypatch.setenv("CONFIG_PATH", str(tmp_path))
    assert load_config("ni/mine.json").lora_rank == 3
    assert load_config("ni/mine").lora_rank == 3


def test_unknown_key_names_the_closest_known_key(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config(None, ["learning_rat=1"])
    bad = write(tmp_path / "bad.json", {"n_skill": 3})
    with pytest.raises(ConfigError, match=r"bad\.json.*did you mean 'n_skills'"):
        load_config(bad)


def test_reference_aliases_are_accepted(tmp_path):
    ref = write(tmp_path / "ref.json", {
        "lora_modules": ".*SelfAttention", "lora_layers": "q|v", "poly_selector": "private",
        "poly_granularity": "layerwise", "model_modifier": "poly_lora", "lora_init_scale": 0.01,
    })
    with pytest.warns(UserWarning, match="lora_init_scale"):
        cfg = load_config(ref)
    assert (cfg.modify_modules, cfg.modify_layers) == (".*SelfAttention", "q|v")
    assert cfg.router_selector == "private" and cfg.router_granularity == "layerwise"
    assert cfg.model_modifier == "poly"
    assert cfg.was_overridden("lora_modules") and cfg.was_overridden("modify_modules")
    assert load_config(None, ["finegrained=False"]).router_granularity == "coarsegrained"
    assert load_config(None, ["finegrained=True"]).router_granularity == "finegrained"
    skilled = load_config(None, ["model_modifier=skilled"])
    assert skilled.router_selector == "private"
    for name in ("lora", "ia3", "poly", "poly_ia3"):
        assert load_config(None, [f"model_modifier={name}"]).model_modifier == name


def test_env_defaults_and_var_expansion(monkeypatch, tmp_path):
    for var, key in [("T0_DATA_DIR", "t0_data_dir"), ("NI_DATA_DIR", "ni_data_dir"),
                     ("XFIT_DATA_DIR", "xfit_data_dir"), ("CHECKPOINT_DIR", "checkpoint_dir"),
                     ("OUTPUT_DIR", "output_dir"), ("CACHE_DIR", "cache_dir")]:
        monkeypatch.setenv(var, f"/env/{var}")
        assert getattr(Config(), key) == f"/env/{var}"
    monkeypatch.setenv("NI_DATA_DIR", "/data/ni")
    assert load_config(None, ["dataset=ni"]).resolved_data_dir() == "/data/ni"
    monkeypatch.setenv("MY_ROOT", str(tmp_path))
    cfg = load_config(None, ["output_dir=$MY_ROOT/runs", "data_dir=${MY_ROOT}/shards"])
    assert cfg.output_dir == f"{tmp_path}/runs" and cfg.data_dir == f"{tmp_path}/shards"
    with pytest.raises(ConfigError, match=r"output_dir.*\$NOT_SET_ANYWHERE"):
        load_config(None, ["output_dir=$NOT_SET_ANYWHERE/x"])


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="n_skills"):
        load_config(None, ["n_skills=many"])
    with pytest.raises(ConfigError, match="zero_stage.*one of"):
        load_config(None, ["zero_stage=5"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["lora_rank"])


def test_saved_config_round_trips_with_overrides(tmp_path):
    cfg = load_config(None, ["lora_rank=3", "tasks=['a','b']"])
    path = cfg.save(tmp_path / "run")
    assert path.name == "config.json"
    data = json.loads(path.read_text())
    assert data["lora_rank"] == 3 and "lora_rank" in data["_overridden"]
    back = Config.load(path)
    assert back.lora_rank == 3 and back.tasks == ["a", "b"]
    assert back.was_overridden("lora_rank") and not back.was_overridden("n_skills")
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_every_field_has_help_with_an_example():
    for name in Config.field_names():
        text = Config.help_for(name)
        assert text and "Example" in text, name


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["configs", "-k", "learning_rat=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "learning_rate" in err[0]


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "mttl.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in ("prepare", "pretrain", "finetune", "evaluate", "sweep", "report", "export"):
        assert verb in out.stdout, verb
