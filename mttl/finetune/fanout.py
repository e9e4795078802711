"""Several held-out tasks at once: every task × seed pair of `mttl finetune` as its own Ray task.

Owns the multi-task form of `mttl finetune` (`finetune_task_name` as a list, or `tasks=[...]` /
`tasks=held_out` for every held-out task of the data): which pairs are still to run, their Ray
resources (`resources_per_run`), writing each finished pair into the run folder's results.jsonl
and results.csv (the whole file renamed into place after every pair, so a killed driver loses only
the pairs still in flight) and the progress line per finished pair. A pair's model, device and
precision are decided inside its Ray task by `mttl.device` (the GPUs Ray assigned it); the loop
itself is `mttl.finetune.loop`'s. A rerun of the same command reads results.jsonl back and skips
every pair whose test row is there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mttl.config import Config
from mttl.console import log_path, to_log
from mttl.errors import ConfigError, MttlError

HELD_OUT = "held_out"  # -k tasks=held_out: every held-out task of the data


def requested_tasks(cfg: Config) -> list[str] | None:
    """The tasks named for a multi-task run, None for the one-task form (a plain finetune_task_name)."""
    name = cfg.finetune_task_name
    if isinstance(name, list):
        return list(name)
    if name is None and cfg.tasks:
        return list(cfg.tasks)
    return None


def resolve_tasks(cfg: Config, names: list[str]) -> list[str]:
    """`names` with `held_out` expanded to the data's held-out tasks, each once, in the given order."""
    from mttl.data.locate import resolve_data_dir
    from mttl.evaluation.zeroshot import held_out_tasks
    from mttl.finetune.types import checkpoint_finetune_config

    out: list[str] = []
    for name in names:
        if name == HELD_OUT:
            data_dir = resolve_data_dir(checkpoint_finetune_config(cfg.copy(finetune_task_name=None, tasks=None)))
            expanded = held_out_tasks(data_dir)
            if not expanded:
                raise ConfigError(f"tasks=held_out but {data_dir}/manifest.json has no held-out tasks; name them: "
                                  "-k finetune_task_name=\"['task_a','task_b']\"")
        else:
            expanded = [name]
        out += [task for task in expanded if task not in out]
    if not out:
        raise ConfigError("finetune_task_name is an empty list; name at least one held-out task")
    return out


def resources_per_run(cfg: Config) -> dict:
    """Ray resources of one task × seed pair: `resources_per_run`, else 1 CPU (+ 1 GPU when the
    cluster's GPUs are used); ConfigError for use_gpu=True with resources that hold no GPU."""
    from mttl.device import cluster_uses_gpu, requested_gpu

    on_gpu = cluster_uses_gpu(cfg)
    if cfg.resources_per_run:
        resources = {k: float(v) for k, v in dict(cfg.resources_per_run).items()}
        if requested_gpu(cfg) and resources.get("GPU", 0) <= 0:
            raise ConfigError(f"use_gpu=True but resources_per_run={cfg.resources_per_run} gives the runs no GPU; "
                              "add one, e.g. -k resources_per_run=\"{'CPU': 2, 'GPU': 0.25}\", or set use_gpu=auto")
        return resources
    return {"CPU": 1.0, "GPU": 1.0} if on_gpu else {"CPU": 1.0}


def _ray_options(resources: dict) -> dict:
    extra = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    options = {"num_cpus": resources.get("CPU", 1.0), "num_gpus": resources.get("GPU", 0.0), "max_retries": 0}
    if extra:
        options["resources"] = extra
    return options


def run_as_ray_tasks(function, cfg: Config, units: list[tuple], resources: dict, describe):
    """`function(cfg, *unit)` for every unit as its own Ray task with `resources`, yielding
    (unit, result) as each finishes. The first failure cancels the rest and raises one line naming
    the unit (`describe(unit)`): the cause's own MttlError where there is one."""
    import ray

    remote = ray.remote(function).options(**_ray_options(resources))
    cfg_ref = ray.put(cfg)
    refs = {remote.remote(cfg_ref, *unit): unit for unit in units}
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        unit = refs.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayTaskError as err:
            for ref in refs:
                ray.cancel(ref, force=True)
            cause = getattr(err, "cause", None)
            if isinstance(cause, MttlError):
                raise type(cause)(f"{describe(unit)}: {cause}") from None
            # str(err) starts with the task's name ("ray::run_pair()"); the cause says what went wrong
            reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
            first_line = next((line for line in reason.splitlines() if line.strip()), type(err).__name__)
            where = f" (the traceback is in {log_path()})" if to_log(f"{describe(unit)} failed:\n{err}") else ""
            raise MttlError(f"{describe(unit)} failed: {first_line}{where}") from None
        yield unit, result


def run_pair(cfg: Config, task: str, seed: int) -> tuple[list[dict], list[dict]]:
    """One task × seed in this process (a Ray task): its result rows and its metric records."""
    from mttl.finetune.loop import finetune_seed, prepare_seed
    from mttl.finetune.types import checkpoint_finetune_config

    pair_cfg = cfg.copy(finetune_task_name=task, tasks=None)
    records: list[dict] = []
    setup = prepare_seed(pair_cfg, task, seed, checkpoint_finetune_config(pair_cfg))
    rows = finetune_seed(pair_cfg, task, seed, log=lambda r: records.append({**r, "task": task}), setup=setup)
    return rows, records


def run_finetune_tasks(cfg: Config, names: list[str], *, echo=print) -> Path:
    """Every task × seed of `names` as Ray tasks; returns the run folder (results.jsonl / .csv)."""
    from mttl.device import backbone_dtype, check_before_ray, check_precision, resolve_device
    from mttl.errors import set_interrupt_hint
    from mttl.data.locate import resolve_data_dir
    from mttl.data.shards import task_info
    from mttl.finetune.loop import default_seeds
    from mttl.finetune.types import checkpoint_finetune_config
    from mttl.progress import progress_line
    from mttl.ray_utils import init_ray
    from mttl.run_folder import (pull_run, push_run, read_results, remote_run_for, run_dir_for, safe_name,
                                 write_results)
    from mttl.sweep import with_absolute_paths
    from mttl.tracking import MetricsLogger

    # use_gpu=True without a GPU, precision=16 on CPU, a backbone_dtype that does not fit: one line, first
    check_before_ray(cfg)
    joining = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if not joining or joining == "local":  # a cluster started here has this machine's devices only
        check_precision(cfg.precision, resolve_device(cfg))
    backbone_dtype(cfg)
    cfg = with_absolute_paths(cfg)  # Ray tasks run in their own working folders
    tasks = resolve_tasks(cfg, names)
    kind = cfg.finetune_type or "Poly"
    named = cfg.copy(run_name=cfg.run_name or safe_name(f"finetune_{len(tasks)}tasks_{kind}"))
    # output_dir in a bucket: the run's files are read from it first and uploaded after every pair
    run_uri, run_dir = remote_run_for(named, "finetune"), run_dir_for(named, "finetune")
    # unknown task, a checkpoint that does not fit the keys: fail here, before any Ray task starts
    seeds = {}
    for task in tasks:
        merged = checkpoint_finetune_config(cfg.copy(finetune_task_name=task, tasks=None))
        task_info(resolve_data_dir(merged), task)
        seeds[task] = default_seeds(merged)
    pull_run(run_dir, run_uri)
    rows = read_results(run_dir)
    done = {(r["task"], r["seed"]) for r in rows if r["finetune_type"] == kind and r["evaluation"] == "test"}
    # rows of a pair without its test row are from a pair that did not finish: it runs again
    rows = [r for r in rows if r["finetune_type"] != kind or (r["task"], r["seed"]) in done]
    pairs = [(task, seed) for task in tasks for seed in seeds[task]]
    pending = [pair for pair in pairs if pair not in done]
    skipped = [pair for pair in pairs if pair in done]
    if skipped:
        echo(f"{len(skipped)} of {len(pairs)} task x seed pairs already in {run_dir / 'results.jsonl'}, not run "
             f"again: {', '.join(f'{t}/{s}' for t, s in skipped)}")
    cfg.copy(finetune_task_name=tasks, tasks=None).save(run_dir)
    if not pending:
        write_results(run_dir, rows)
        push_run(run_dir, run_uri)
        return run_dir
    init_ray(cfg)
    resources = resources_per_run(cfg)
    set_interrupt_hint(f"finished task x seed pairs are kept in {run_dir / 'results.jsonl'}; run the same command "
                       "again to run only the rest")
    echo(f"running {len(pending)} task x seed pairs as Ray tasks, each with {resources}")
    start, finished = time.monotonic(), 0
    with MetricsLogger(run_dir, cfg) as logger:
        for (task, seed), (pair_rows, records) in run_as_ray_tasks(run_pair, cfg, pending, resources,
                                                                   lambda pair: f"task {pair[0]} seed {pair[1]}"):
            rows += pair_rows
            write_results(run_dir, rows)
            for record in records:
                logger.log(record)
            push_run(run_dir, run_uri)
            finished += 1
            test = next((r for r in pair_rows if r["evaluation"] == "test"), None)
            score = f" test {test['metric']} {test['value']:.2f}" if test else ""
            echo(progress_line(len(skipped) + finished, len(pairs), f"{task} seed {seed} done{score}",
                               time.monotonic() - start, finished, len(pending) - finished), flush=True)
    push_run(run_dir, run_uri)  # the logger's last lines, written as it closed
    return run_dir
