"""Starting or joining Ray with safe defaults, and the per-worker resources of a training run.

A cluster that mttl starts itself listens on 127.0.0.1 only and uses Ray's token authentication
(Ray's default for a local cluster); an existing cluster is joined only when `ray_address` or
`RAY_ADDRESS` says so, and its authentication mode is the cluster's: workers inherit it from
their node, never from this process. Each run names its own cluster explicitly, so several runs
on one machine never look each other's clusters up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading

import mttl  # noqa: F401  (sets the environment Ray reads on import)
from mttl import console
from mttl.config import Config
from mttl.device import uses_gpu
from mttl.errors import ConfigError

# Seconds to wait for a TCP answer from `ray_address` before calling it unreachable (Ray itself
# retries an unreachable address for minutes and does not stop on Ctrl-C meanwhile).
CONNECT_TIMEOUT_S = 5.0


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment for training workers (DeepSpeed picks its accelerator from DS_ACCELERATOR).

    Passed as the workers' runtime env, so it reaches them on any cluster, joined or started.
    RAY_AUTH_MODE is left out on purpose: a worker must run in its cluster's mode.
    """
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
           "TOKENIZERS_PARALLELISM": "false"}
    # named either way: a DS_ACCELERATOR=cpu exported for CPU runs would otherwise reach GPU workers through
    # their node's environment and put DeepSpeed on the CPU beside an NCCL process group
    env["DS_ACCELERATOR"] = "cuda" if uses_gpu(cfg) else "cpu"
    # glibc raises its mmap threshold to 32 MB after the first large free, so the many 1-32 MB
    # weight and buffer allocations of building and gathering a backbone then come from arenas
    # it never gives back: measured on a T5-large-shaped ZeRO-3 worker, 8.8 GB resident and
    # growing (killed) against a 6.4 GB peak with the threshold fixed at 1 MB.
    # ZeRO-3 also gathers and frees every layer's parameters in each forward and backward; the
    # gathered skill inventories (0.5 MB each there) then came from the heap and, freed between
    # the activations kept for the backward, left it fragmented: that forward grew 0.96 GB at 1 MB
    # against 0.46 at glibc's own starting threshold, 128 KB, which ZeRO-3 workers keep instead.
    mmap_threshold = 128 << 10 if cfg.zero_stage == 3 else 1 << 20
    env["MALLOC_MMAP_THRESHOLD_"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", str(mmap_threshold))
    env["MALLOC_TRIM_THRESHOLD_"] = os.environ.get("MALLOC_TRIM_THRESHOLD_", str(1 << 20))
    if os.environ.get("HF_HUB_OFFLINE"):
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        env["RAY_API_SERVER_ADDRESS"] = os.environ["RAY_API_SERVER_ADDRESS"]
    # tracking settings (W&B offline mode, credentials, MLflow options) reach rank 0, which logs
    env.update({k: v for k, v in os.environ.items() if k.startswith(("WANDB_", "MLFLOW_"))})
    return env


def init_ray(cfg: Config) -> None:
    """Join `cfg.ray_address` / RAY_ADDRESS when given, else start a private local cluster."""
    import ray

    if ray.is_initialized():
        return
    if not uses_gpu(cfg):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("auto", "local"):
        check_reachable(address)
    from ray.exceptions import AuthenticationError

    # Ray's core worker installs a C-level SIGTERM handler that aborts the process (exit -6, a stack
    # dump); the command's own handler (a clean exit 143 with a resume hint) is put back after init.
    sigterm_handler = signal.getsignal(signal.SIGTERM) if _on_main_thread() else None
    # Ray's own log lines (its start, auth mode, Ray Data plans, worker chatter) go to the run's log
    # file, not the console; a command that knows its run folder has already pointed them there.
    if console.log_path() is None:
        from mttl.storage import is_uri, local_mirror

        # an output_dir in a bucket: the log stays on this machine, beside its copies of that bucket's runs
        where = local_mirror(cfg.output_dir, cfg.cache_dir) if is_uri(cfg.output_dir) else cfg.output_dir
        console.send_internal_logs_to(console.default_log_path(where), verbose=cfg.verbose)
    try:
        if address and address != "local":
            # Training workers get their environment from `worker_env` through the trainer's RunConfig;
            # the job-level env only tells Ray Train's own actors which cluster they are on.
            context = ray.init(address=address, log_to_driver=True, runtime_env=_joined_cluster_env(address))
            _remember_api_server(getattr(context, "dashboard_url", None))
        else:
            start_local_cluster(ray)
    except ConnectionError as err:
        raise ConfigError(f"cannot connect to the Ray cluster at ray_address={address!r}: {err}; "
                          "check the address or unset it to start a local cluster") from None
    except AuthenticationError:
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        raise ConfigError(f"the Ray cluster at ray_address={address!r} refused this client's authentication "
                          f"(RAY_AUTH_MODE={mode}); set RAY_AUTH_MODE (and RAY_AUTH_TOKEN) as the cluster was "
                          "started with") from None
    finally:
        if callable(sigterm_handler):
            signal.signal(signal.SIGTERM, sigterm_handler)
    console.route_worker_output()


def _joined_cluster_env(address: str) -> dict | None:
    """The job env that names the joined cluster to Ray Train's controller and its actors.

    Ray Train's placement-group cleaner asks the state API whether the controller lives, and finds
    the API through RAY_API_SERVER_ADDRESS or RAY_ADDRESS; with neither set it looks among all Ray
    instances on its machine and fails when there are several ("Found multiple active Ray
    instances"). The GCS address is what is known before connecting, so RAY_ADDRESS is set. Inside a
    submitted job whose own runtime env already sets it, nothing is added (Ray refuses a clash).
    """
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray._private.services import canonicalize_bootstrap_address

    if address.startswith("ray://"):
        return None  # a Ray Client connection: the server side runs in the cluster's own env
    try:
        gcs_address = canonicalize_bootstrap_address(address)
    except Exception:  # noqa: BLE001 - ray.init reports an unusable address itself
        return None
    if not gcs_address:
        return None
    job_config = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if job_config and "RAY_ADDRESS" in ((json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}):
        return None
    return {"env_vars": {"RAY_ADDRESS": gcs_address}}


def _remember_api_server(dashboard: str | None) -> None:
    """Point this process's state-API calls (and the workers', via `worker_env`) at the joined head."""
    if dashboard and not os.environ.get("RAY_API_SERVER_ADDRESS"):
        os.environ["RAY_API_SERVER_ADDRESS"] = dashboard if "://" in dashboard else f"http://{dashboard}"


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def start_local_cluster(ray, *, env_vars: dict[str, str] | None = None, **init_args) -> None:
    """A local cluster on 127.0.0.1 whose dashboard port is chosen here (`env_vars` and `init_args`:
    more job environment and `ray.init` arguments, e.g. the test session's `num_cpus`).

    Ray Train's placement-group cleaner asks Ray's state API (served by the dashboard) whether the
    run's controller lives; without an address it looks the cluster up among every Ray instance on
    the machine and fails when another run has one ("Found multiple active Ray instances"). The
    dashboard port is picked before the start so every process of this run is told its address.
    """
    port = free_loopback_port()
    api_server = f"http://127.0.0.1:{port}"
    os.environ["RAY_API_SERVER_ADDRESS"] = api_server
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {**(env_vars or {}), "RAY_API_SERVER_ADDRESS": api_server}}, **init_args)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_reachable(address: str) -> None:
    """Fail in seconds with one line when nothing answers at a `host:port` or `ray://host:port` address."""
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray_address={address!r} is not host:port (example: -k ray_address=10.0.0.5:6379, "
                          "ray://head:10001 or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise ConfigError(f"no Ray cluster answers at ray_address={address!r} ({err.strerror or err}); start it "
                          "with `ray start --head`, check the address and firewall, or unset ray_address to "
                          "start a local cluster") from None


def resources_per_worker(cfg: Config) -> dict:
    """`cfg.resources_per_worker`, else 1 CPU per GPU worker, else a share of the CPUs.

    On CPU the workers leave half of the cluster's CPUs free: Ray Data's read and tokenize
    tasks need CPUs of their own, and a run whose workers take every CPU never gets its data.
    """
    if cfg.resources_per_worker:
        return dict(cfg.resources_per_worker)
    if uses_gpu(cfg):
        return {"CPU": 1}
    import ray

    total = float(ray.cluster_resources().get("CPU", 1))
    share = max(0.1, min(1.0, total / (2 * cfg.num_workers)))
    return {"CPU": round(share, 2)}


def run_in_background(fn, *args, **kwargs):
    """Call `fn` in a daemon thread and wait for it in a way Ctrl-C and SIGTERM interrupt.

    Ray Train's and Ray Tune's `fit()` take over SIGINT when called from the main thread (and may
    end the process with status 0); from another thread they do not, so the CLI stops with 130
    and the run's actors, owned by this driver, end with it. The checkpoints stay for a resume.
    """
    import threading

    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name=f"mttl-{getattr(fn, '__name__', 'run')}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@contextlib.contextmanager
def train_timeouts(cfg: Config):
    """Ray Train's bounded waits for this run: worker start and collectives (reports, checkpoints).

    Ray Train reads them from the driver's environment and hands them to its controller. A key set
    in the config wins over an exported variable, which wins over the key's default.
    """
    keys = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "worker_start_timeout_s",
            "RAY_TRAIN_COLLECTIVE_TIMEOUT_S": "collective_timeout_s"}
    previous = {env: os.environ.get(env) for env in keys}
    for env, key in keys.items():
        if previous[env] is None or cfg.was_overridden(key):
            os.environ[env] = f"{float(getattr(cfg, key)):g}"
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_reachable_cluster(cfg: Config) -> None:
    """The address part of `init_ray`, run before anything is written."""
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("auto", "local"):
        import ray

        if not ray.is_initialized():
            check_reachable(address)
