"""Starting or joining Ray with safe defaults, and the per-worker resources of a training run.

A cluster that mttl starts itself listens on 127.0.0.1 only and uses Ray's token
authentication; an existing cluster is joined only when `ray_address` or `RAY_ADDRESS` says so.
Every worker gets the environment DeepSpeed and Ray need (CPU accelerator when there is no GPU).
"""

from __future__ import annotations

import os

from mttl.config import Config
from mttl.errors import ConfigError

# Environment every Ray process of a run needs; set before ray.init so the local cluster inherits it.
SAFE_ENV = {
    # keep a local cluster on the loopback interface instead of the machine's public address
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # CLI clients and the cluster must agree on token authentication
    "RAY_AUTH_MODE": "token",
    "TOKENIZERS_PARALLELISM": "false",
}
# Ray reads these when it is imported, so they are set when this module is imported (before Ray
# is, in every mttl entry point); values the user exported win.
for _key, _value in SAFE_ENV.items():
    os.environ.setdefault(_key, _value)


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment for training workers (DeepSpeed picks its accelerator from DS_ACCELERATOR).

    Passed as the workers' runtime env, so it reaches them on any cluster, joined or started.
    """
    env = dict(SAFE_ENV)
    if not cfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    if os.environ.get("HF_HUB_OFFLINE"):
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    # tracking settings (W&B offline mode, credentials, MLflow options) reach rank 0, which logs
    env.update({k: v for k, v in os.environ.items() if k.startswith(("WANDB_", "MLFLOW_"))})
    return env


def init_ray(cfg: Config) -> None:
    """Join `cfg.ray_address` / RAY_ADDRESS when given, else start a private local cluster."""
    import ray

    if ray.is_initialized():
        return
    if not cfg.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    # No runtime env here: inside a submitted job it would clash with the job's own; training
    # workers get theirs from `worker_env` through the trainer's RunConfig.
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # The dashboard (on 127.0.0.1) serves Ray's state API, which Ray Train's placement-group
            # cleaner polls every second: without it every run logs a warning a second.
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1")
    except ConnectionError as err:
        raise ConfigError(f"cannot connect to the Ray cluster at ray_address={address!r}: {err}; "
                          "check the address or unset it to start a local cluster") from None


def resources_per_worker(cfg: Config) -> dict:
    """`cfg.resources_per_worker`, else 1 CPU per GPU worker, else a share of the CPUs.

    On CPU the workers leave half of the cluster's CPUs free: Ray Data's read and tokenize
    tasks need CPUs of their own, and a run whose workers take every CPU never gets its data.
    """
    if cfg.resources_per_worker:
        return dict(cfg.resources_per_worker)
    if cfg.use_gpu:
        return {"CPU": 1}
    import ray

    total = float(ray.cluster_resources().get("CPU", 1))
    share = max(0.1, min(1.0, total / (2 * cfg.num_workers)))
    return {"CPU": round(share, 2)}
