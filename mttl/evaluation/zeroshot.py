"""Scoring a pre-trained run on tasks without training (`mttl evaluate`).

Tasks the run was trained on keep their routing row; unseen (held-out) tasks are scored with
every learned router replaced by the uniform average of the skills (MHR-µ zero-shot). With
`-k router_selector=arrow` every task is scored with Arrow routing over the library's skills
(`arrow_top_k`, `arrow_temperature`), which needs no task id. Results go
to `$output_dir/$run_name/results.jsonl` and `results.csv` (evaluation `zero_shot`), in the same
row format as fine-tuning, with the mean over tasks and per category in `summary`. The model is
scored on the device `use_gpu` gives this process, under `precision` (`mttl.device`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import fmean

from mttl.config import Config
from mttl.errors import ConfigError
from mttl.evaluation.metrics import SCORE_KEYS, task_metric
from mttl.evaluation.predict import evaluate_rows

SEEN, AVERAGE, ARROW = "seen_routing", "average_routing", "arrow_routing"


def held_out_tasks(data_dir: str) -> list[str]:
    """The manifest's held-out (role `test`) tasks, in name order."""
    from mttl.data.shards import read_manifest

    return sorted(name for name, meta in read_manifest(data_dir)["tasks"].items() if meta.get("role") == "test")


def evaluate_checkpoint(cfg: Config) -> tuple[Path, dict]:
    """Score `cfg.checkpoint` on `cfg.tasks` (default: the held-out tasks); returns (run folder, summary)."""
    from mttl import device
    from mttl.adapters import ops
    from mttl.adapters.inject import adapter_config
    from mttl.data.fewshot import eval_rows
    from mttl.data.locate import resolve_data_dir
    from mttl.data.shards import task_info
    from mttl.finetune.types import inherit_checkpoint_config
    from mttl.models.run import load_run
    from mttl.run_folder import run_dir_for, write_results

    # use_gpu=True without a GPU, precision=16 on CPU, a backbone_dtype that does not fit: one line, first
    target = device.resolve_device(cfg)
    device.check_precision(cfg.precision, target)
    if not cfg.checkpoint:
        raise ConfigError("evaluate needs a pre-trained run: -k checkpoint=$output_dir/$run_name")
    loaded = load_run(cfg.checkpoint_path(), trust_remote_code=cfg.trust_remote_code)
    loaded.model.requires_grad_(False)  # scoring trains nothing: a fully trained backbone is cast too
    device.cast_frozen_backbone(loaded.model, device.backbone_dtype(cfg))
    device.place_model(loaded.model, target)
    merged = inherit_checkpoint_config(loaded.cfg, cfg)
    data_dir = resolve_data_dir(merged)
    tasks = list(cfg.tasks) if cfg.tasks else held_out_tasks(data_dir)
    if not tasks:
        raise ConfigError(f"{data_dir} has no held-out tasks; name the tasks to score: -k tasks=['task_a','task_b']")
    infos = {task: task_info(data_dir, task) for task in tasks}
    acfg = adapter_config(loaded.model)
    learned_routing = acfg is not None and acfg.routed and acfg.selector == "poly"
    arrow = merged.router_selector == "arrow"
    if arrow:
        ops.use_router(loaded.model, "arrow", arrow_top_k=merged.arrow_top_k,
                       arrow_temperature=merged.arrow_temperature)
        learned_routing = False
    # seen tasks first: switching to average routing replaces the learned routers for good
    order = sorted(tasks, key=lambda t: t not in loaded.tasks)
    rows, switched = [], False
    for task in order:
        seen = task in loaded.tasks
        if not seen and learned_routing and not switched:
            ops.switch_to_average(loaded.model)
            switched = True
        # the T-Few protocol: a task without a test split is scored on its validation split
        test_rows = eval_rows(data_dir, task, "test" if infos[task]["rows"].get("test") else "validation")
        metric = task_metric(test_rows, infos[task].get("metric"))
        scores = evaluate_rows(loaded.model, loaded.tokenizer, test_rows, loaded.tasks.get(task, 0), metric, merged)
        rows.append({"task": task, "seed": merged.seed, "finetune_type": ARROW if arrow else SEEN if seen else AVERAGE,
                     "evaluation": "zero_shot", "metric": scores["metric"], "value": scores["value"],
                     "step": 0, "epoch": 0, "category": infos[task].get("category"),
                     **{k: scores[k] for k in SCORE_KEYS if k in scores}})
    run_dir = run_dir_for(cfg.copy(run_name=cfg.run_name or f"evaluate_{loaded.run_dir.name}"), "evaluate")
    merged.save(run_dir)
    write_results(run_dir, rows)
    by_category = defaultdict(list)
    for row in rows:
        if row["category"]:
            by_category[row["category"]].append(row["value"])
    summary = {"per_task": {r["task"]: r["value"] for r in rows}, "mean": fmean(r["value"] for r in rows),
               "per_category": {c: fmean(v) for c, v in sorted(by_category.items())}}
    return run_dir, summary
