"""Scoring a pre-trained run on tasks without training (`mttl evaluate`).

Tasks the run was trained on keep their routing row; unseen (held-out) tasks are scored with
every learned router replaced by the uniform average of the skills (MHR-µ zero-shot). With
`-k router_selector=arrow` every task is scored with Arrow routing over the library's skills
(`arrow_top_k`, `arrow_temperature`), which needs no task id. Results go
to `$output_dir/$run_name/results.jsonl` and `results.csv` (evaluation `zero_shot`), in the same
row format as fine-tuning, with the mean over tasks and per category in `summary`, each task's row
written as soon as it is scored, so a rerun of the same command scores only the rest. The model is
scored on the device `use_gpu` gives the process that scores it, under `precision` (`mttl.device`):
this one, loading the model once for all tasks, or, with `resources_per_run` or on a joined
cluster, one Ray task per task with those resources (a GPU fraction packs several on a card).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from statistics import fmean
from typing import Iterator

from mttl.config import Config
from mttl.errors import ConfigError, MttlError
from mttl.evaluation.metrics import SCORE_KEYS, task_metric
from mttl.evaluation.predict import evaluate_rows

SEEN, AVERAGE, ARROW = "seen_routing", "average_routing", "arrow_routing"
HELD_OUT = "held_out"  # -k tasks=held_out


def held_out_tasks(data_dir: str) -> list[str]:
    """The manifest's held-out (role `test`) tasks, in name order."""
    from mttl.data.shards import read_manifest

    return sorted(name for name, meta in read_manifest(data_dir)["tasks"].items() if meta.get("role") == "test")


# keys that change where or how fast the scores are computed, not the scores: a rerun that
# differs only in these keeps the tasks already scored
_NOT_SCORE_KEYS = ("tasks", "resources_per_run", "ray_address", "verbose", "tensorboard", "mlflow",
                   "predict_batch_size", "use_gpu", "run_name", "output_dir", "cache_dir", "checkpoint_dir")


def fans_out(cfg: Config, tasks: list[str]) -> bool:
    """Several tasks run as Ray tasks with `resources_per_run` when asked for it or on a cluster
    (`ray_address`/RAY_ADDRESS); otherwise in this process, the model loaded once for all tasks."""
    joining = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    return len(tasks) > 1 and bool(cfg.resources_per_run or (joining and joining != "local"))


def score_tasks(cfg: Config, tasks: list[str]) -> Iterator[dict]:
    """Load `cfg.checkpoint` on this process's device (`mttl.device`: inside a Ray task, the GPUs Ray
    assigned it) and yield each task's `zero_shot` result row as it is scored."""
    from mttl import device
    from mttl.adapters import ops
    from mttl.adapters.inject import adapter_config
    from mttl.data.fewshot import eval_rows
    from mttl.data.locate import resolve_data_dir
    from mttl.data.shards import task_info
    from mttl.finetune.types import inherit_checkpoint_config
    from mttl.models.run import load_run

    target = device.resolve_device(cfg)
    loaded = load_run(cfg.checkpoint_path(), trust_remote_code=cfg.trust_remote_code)
    loaded.model.requires_grad_(False)  # scoring trains nothing: a fully trained backbone is cast too
    device.cast_frozen_backbone(loaded.model, device.backbone_dtype(cfg))
    device.place_model(loaded.model, target)
    merged = inherit_checkpoint_config(loaded.cfg, cfg)
    data_dir = resolve_data_dir(merged)
    acfg = adapter_config(loaded.model)
    learned_routing = acfg is not None and acfg.routed and acfg.selector == "poly"
    arrow = merged.router_selector == "arrow"
    if arrow:
        ops.use_router(loaded.model, "arrow", arrow_top_k=merged.arrow_top_k,
                       arrow_temperature=merged.arrow_temperature)
        learned_routing = False
    # seen tasks first: switching to average routing replaces the learned routers for good
    switched = False
    for task in sorted(tasks, key=lambda t: t not in loaded.tasks):
        seen = task in loaded.tasks
        if not seen and learned_routing and not switched:
            ops.switch_to_average(loaded.model)
            switched = True
        info = task_info(data_dir, task)
        # the T-Few protocol: a task without a test split is scored on its validation split
        test_rows = eval_rows(data_dir, task, "test" if info["rows"].get("test") else "validation")
        metric = task_metric(test_rows, info.get("metric"))
        scores = evaluate_rows(loaded.model, loaded.tokenizer, test_rows, loaded.tasks.get(task, 0), metric, merged)
        yield {"task": task, "seed": merged.seed, "finetune_type": ARROW if arrow else SEEN if seen else AVERAGE,
               "evaluation": "zero_shot", "metric": scores["metric"], "value": scores["value"],
               "step": 0, "epoch": 0, "category": info.get("category"),
               **{k: scores[k] for k in SCORE_KEYS if k in scores}}


def score_task(cfg: Config, task: str) -> dict:
    """One task's row, in its own Ray task."""
    return next(score_tasks(cfg, [task]))


def evaluate_checkpoint(cfg: Config, *, echo=print) -> tuple[Path, dict]:
    """Score `cfg.checkpoint` on `cfg.tasks` (default: the held-out tasks); returns (run folder, summary).

    Each scored task is written to the run folder at once; the same command run again scores only
    the tasks not there yet (a saved config that differs in a key that changes scores starts over)."""
    from mttl import device
    from mttl.console import hide_progress_bars
    from mttl.data.locate import resolve_data_dir
    from mttl.data.shards import task_info
    from mttl.finetune.types import inherit_checkpoint_config
    from mttl.models.run import read_tasks_file, resolve_run_dir
    from mttl.run_folder import pull_run, push_run, remote_run_for, run_dir_for, write_results

    hide_progress_bars(cfg.verbose)
    # use_gpu=True without a GPU, precision=16 on CPU, a backbone_dtype that does not fit: one line, first
    device.check_before_ray(cfg)
    joining = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if not joining or joining == "local":  # a cluster started here has this machine's devices only
        device.check_precision(cfg.precision, device.resolve_device(cfg))
    if not cfg.checkpoint:
        raise ConfigError("evaluate needs a pre-trained run: -k checkpoint=$output_dir/$run_name")
    checkpoint = resolve_run_dir(cfg.checkpoint_path())
    read_tasks_file(checkpoint)  # a damaged tasks.json: one line before anything runs
    merged = inherit_checkpoint_config(Config.load(checkpoint / "config.json"), cfg)
    data_dir = resolve_data_dir(merged)
    tasks = []
    for name in cfg.tasks or [HELD_OUT]:  # -k tasks=held_out (the default): every held-out task of the data
        tasks += [task for task in (held_out_tasks(data_dir) if name == HELD_OUT else [name]) if task not in tasks]
    if not tasks:
        raise ConfigError(f"{data_dir} has no held-out tasks; name the tasks to score: -k tasks=['task_a','task_b']")
    infos = {task: task_info(data_dir, task) for task in tasks}  # an unknown task: one line, first
    named = cfg.copy(run_name=cfg.run_name or f"evaluate_{checkpoint.name}")
    run_dir = run_dir_for(named, "evaluate")
    run_uri = remote_run_for(named, "evaluate")  # output_dir in a bucket: rows read from it, each score uploaded
    pull_run(run_dir, run_uri)
    rows = _rows_to_keep(run_dir, merged)
    done = {r["task"] for r in rows}
    pending = [task for task in tasks if task not in done]
    if done & set(tasks):
        echo(f"{len(set(tasks) - set(pending))} of {len(tasks)} tasks already scored in "
             f"{run_uri + '/results.jsonl' if run_uri else run_dir / 'results.jsonl'}, not scored again")
    saved = []

    def keep(row: dict) -> None:
        if not saved:  # with the first score: a run that fails to load leaves no folder behind
            saved.append(merged.save(run_dir))
        rows.append(row)
        write_results(run_dir, rows)
        push_run(run_dir, run_uri)

    if pending and fans_out(cfg, pending):
        _score_as_ray_tasks(cfg, pending, keep, echo)
    elif pending:
        for row in score_tasks(cfg, pending):
            keep(row)
    scored = [r for r in rows if r["task"] in infos]
    by_category = defaultdict(list)
    for row in scored:
        if row["category"]:
            by_category[row["category"]].append(row["value"])
    summary = {"per_task": {r["task"]: r["value"] for r in scored}, "mean": fmean(r["value"] for r in scored),
               "per_category": {c: fmean(v) for c, v in sorted(by_category.items())}}
    return run_dir, summary


def _rows_to_keep(run_dir: Path, merged: Config) -> list[dict]:
    """The zero-shot rows of an earlier run of the same evaluation in `run_dir`; none when its saved
    config scores differently (another checkpoint, router or scoring key)."""
    from mttl.run_folder import read_results

    saved = run_dir / "config.json"
    if not saved.is_file():
        return []
    try:
        earlier = Config.load(saved)
    except MttlError:
        return []
    if earlier.diff(merged, ignore=_NOT_SCORE_KEYS):
        return []
    return [r for r in read_results(run_dir) if r.get("evaluation") == "zero_shot"]


def _score_as_ray_tasks(cfg: Config, tasks: list[str], keep, echo) -> None:
    import time

    from mttl.errors import set_interrupt_hint
    from mttl.finetune.fanout import resources_per_run, run_as_ray_tasks
    from mttl.progress import progress_line
    from mttl.ray_utils import init_ray
    from mttl.sweep import with_absolute_paths

    cfg = with_absolute_paths(cfg)  # Ray tasks run in their own working folders
    init_ray(cfg)
    resources = resources_per_run(cfg)
    set_interrupt_hint("scored tasks are kept in the run folder's results.jsonl; run the same command again to "
                       "score only the rest")
    echo(f"scoring {len(tasks)} tasks as Ray tasks, each with {resources}")
    start = time.monotonic()
    units = [(task,) for task in tasks]
    for finished, ((task,), row) in enumerate(run_as_ray_tasks(score_task, cfg, units, resources,
                                                                 lambda unit: f"task {unit[0]}"), start=1):
        keep(row)
        echo(progress_line(finished, len(tasks), f"{task} {row['metric']} {row['value']:.2f}",
                           time.monotonic() - start, finished, len(tasks) - finished), flush=True)
