"""jobs/cluster.yaml passes Ray's own cluster-config preparation and schema validation (offline, AWS schema)."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "jobs" / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validated(config: dict) -> dict:
    """What `ray up` does before touching the cloud: merge the provider defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_accepts_the_cluster_config(raw):
    config = validated(raw)
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert "GPU" not in head["resources"] and head["resources"]["CPU"] > 0
    gpu_types = {name: t for name, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) >= 1}
    assert len(gpu_types) == 1
    (gpu,) = gpu_types.values()
    assert 0 <= gpu["min_workers"] < gpu["max_workers"] <= config["max_workers"]


def test_validation_really_rejects_broken_configs(raw):
    """The check above means something: Ray's validation catches these edits."""
    typo = copy.deepcopy(raw)
    typo["available_node_types"]["worker.gpu"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validated(typo)
    too_many = copy.deepcopy(raw)
    too_many["available_node_types"]["worker.gpu"]["min_workers"] = raw["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validated(too_many)
    no_head = copy.deepcopy(raw)
    no_head["head_node_type"] = "head.gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        validated(no_head)


def test_nodes_install_the_synced_package_with_matching_ray(raw):
    remote = next(r for r, local in raw["file_mounts"].items() if local == ".")
    assert any("pip install" in c and f"-e {remote}" in c for c in raw["setup_commands"])
    assert ".venv" in raw["rsync_exclude"]
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_pin = next(re.search(r"==([\d.]+)", d).group(1) for d in pins if d.startswith("ray["))
    assert ray_pin == ray.__version__
    for image in (raw["docker"]["head_image"], raw["docker"]["worker_image"]):
        assert image.split(":")[1].startswith(ray_pin + "-py311")
    assert raw["docker"]["worker_image"].endswith("-gpu")


def test_every_node_starts_ray_with_token_auth(raw):
    head = " ".join(raw["head_start_ray_commands"])
    workers = " ".join(raw["worker_start_ray_commands"])
    for commands in (head, workers):
        assert "RAY_AUTH_MODE=token ray start" in commands
    assert "--head" in head and "--dashboard-host=" in head and "--autoscaling-config=" in head
    assert "$RAY_HEAD_IP:6379" in workers
    assert "~/.ray/auth_token" in raw["file_mounts"]
    assert any("/mnt/shared" in option for option in raw["docker"]["run_options"])
