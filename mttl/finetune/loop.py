"""The few-shot loop: one held-out task, one seed, in this process (plain torch, no DeepSpeed).

Per seed: load the checkpoint for the finetune type (`types.load_for_finetuning`), draw the k-shot
split (`mttl.data.fewshot.fewshot_split`), score the test rows zero-shot, train for `total_steps`
optimizer steps (else `num_train_epochs`) validating every `eval_every_epochs` epochs, keep the
best validation weights in memory and score the test rows with them. The model and batches live on
the device `use_gpu` gives this process, losses are computed under `precision`'s autocast (fp16
with a gradient scaler), the trained weights are fp32 (`mttl.device`). Every validation is passed
to `on_validation` (sweeps report it to Ray Tune). A run can stop after some validations and hand
over its whole state (`stop_after_validations`, `on_lap`), and a later run continue from that state
exactly as if it had never stopped (`resume`): a sweep's start race keeps its laps this way.

As the reference: an epoch is the k training instances, each rendered with one of its templates
drawn afresh every epoch (T0; other tasks have one row per instance), in batches of
`train_batch_size` with the incomplete last one dropped; so a 32-shot T0 task at batch 8 and 1,000
steps runs 250 epochs and validates 5 times. Validation runs only at multiples of
`eval_every_epochs` (a run too short to reach one validates once at the end, so a best
validation exists; `finetune_skip_es` validates only at the end). Evaluation scores every
template of every instance (the reference draws one template per instance and pass).

`run_finetune(cfg)` runs every seed of `finetune_task_name` and writes the run folder (several
tasks: every task x seed as a Ray task, `mttl.finetune.fanout`):
`config.json`, `metrics.jsonl` (+ TensorBoard), `results.jsonl` and `results.csv` (one row per
task × seed × evaluation in {zero_shot, best_val, test}), each rewritten atomically.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mttl.config import Config
from mttl.data.locate import resolve_data_dir
from mttl.device import Precision, for_model
from mttl.errors import ConfigError, DataError
from mttl.evaluation.metrics import SCORE_KEYS, is_multiple_choice, task_metric
from mttl.evaluation.predict import encode_choice_batch, encode_sources, encode_targets, evaluate_rows
from mttl.finetune.losses import lm_loss, multiple_choice_loss
from mttl.finetune.types import FinetuneModel, checkpoint_finetune_config, load_for_finetuning
from mttl.run_folder import pull_run, push_run, read_results, remote_run_for, run_dir_for, write_results
from mttl.train.optim import build_optimizer, build_scheduler, optimizer_groups, warmup_steps

T0_SEEDS, OTHER_SEEDS = [42, 1024, 0], [13, 42, 58]
DEFAULT_SHOTS = 32
DEFAULT_STEPS = 1000  # the reference's few-shot budget when neither total_steps nor num_train_epochs is set
TASK_ID = 0  # the held-out task always gets routing row 0


def default_seeds(cfg: Config) -> list[int]:
    return list(cfg.seeds) if cfg.seeds else (T0_SEEDS if cfg.dataset == "t0" else OTHER_SEEDS)


def eval_every_epochs(cfg: Config) -> int:
    return cfg.eval_every_epochs or (50 if cfg.dataset == "t0" else 10)


def num_shots(cfg: Config, info: dict, seed: int, task: str | None = None) -> int:
    """`num_shots`, else the reference's k for a T0 task where it differs from the shipped files'
    (ANLI: 32), else the k of the task's prepared T-Few split for this seed, else 32."""
    from mttl.data.t0 import HELDOUT_TASKS

    if cfg.num_shots:
        return cfg.num_shots
    spec = HELDOUT_TASKS.get(task or "")
    if cfg.dataset == "t0" and spec is not None and spec.shots:
        return spec.shots
    for split in info.get("rows", {}):
        match = re.fullmatch(rf"fewshot_k(\d+)_seed{seed}", split)
        if match:
            return int(match.group(1))
    return DEFAULT_SHOTS


def _train_batches(instances: list[list[dict]], micro_batch: int, rng: random.Random):
    """One epoch of shuffled micro batches, one row per instance (a T0 instance's template drawn
    afresh each epoch); an incomplete last batch is dropped, as the reference."""
    # one-row instances draw nothing, so their shuffles match the row-per-example stream exactly
    rows = [group[0] if len(group) == 1 else rng.choice(group) for group in instances]
    order = list(range(len(rows)))
    rng.shuffle(order)
    for start in range(0, max(len(rows) - micro_batch + 1, 1), micro_batch):
        yield [rows[i] for i in order[start:start + micro_batch]]


def _loss(model, tokenizer, batch_rows: list[dict], cfg: Config, policy: Precision) -> dict:
    """T-Few losses when every row is multiple choice, else the LM loss of the targets, computed
    on the policy's device under its autocast."""
    task_ids = torch.full((len(batch_rows),), TASK_ID, dtype=torch.long, device=policy.device)
    if all(is_multiple_choice(r) for r in batch_rows):
        batch = encode_choice_batch(tokenizer, batch_rows, cfg.max_input_length, cfg.max_output_length)
        with policy.autocast():
            return multiple_choice_loss(model, policy.to_device(batch), task_ids, length_norm=cfg.length_norm,
                                        mc_loss=cfg.mc_loss, unlikely_loss=cfg.unlikely_loss)
    batch = encode_sources(tokenizer, batch_rows, cfg.max_input_length)
    batch["labels"] = encode_targets(tokenizer, [r["target"] for r in batch_rows], cfg.max_output_length)
    with policy.autocast():
        return lm_loss(model, policy.to_device(batch), task_ids)


@torch.no_grad()
def validation_loss(model, tokenizer, rows: list[dict], cfg: Config, policy: Precision) -> float:
    """The training loss of `rows` (teacher-forced, dropout off), averaged over rows."""
    was_training = model.training
    model.eval()
    total, size = 0.0, max(cfg.predict_batch_size, 1)
    try:
        for start in range(0, len(rows), size):
            batch = rows[start:start + size]
            total += _loss(model, tokenizer, batch, cfg, policy)["loss"].item() * len(batch)
    finally:
        model.train(was_training)
    return total / max(len(rows), 1)


def get_rng_state() -> dict:
    """Every generator training draws from (dropout, batch templates), to continue a run exactly."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    # plain lists and tensors only: a saved lap state loads with torch.load(weights_only=True), no pickle
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), position, has_gauss, gauss],
             "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_lap_state(state: dict, task: str, seed: int, total_steps: int) -> None:
    """A lap's state continues only the run it came from: same task, seed and length."""
    theirs = (state.get("task"), state.get("seed"), state.get("total_steps"))
    if theirs != (task, seed, total_steps):
        raise ConfigError(f"cannot continue task '{task}' seed {seed} ({total_steps} steps) from the state of "
                          f"task '{theirs[0]}' seed {theirs[1]} ({theirs[2]} steps)")


def _trainable_state(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@dataclass
class SeedSetup:
    """One seed's model and rows, ready to train: everything the user's input can make fail."""
    ft: FinetuneModel
    train_rows: list[dict]
    val_rows: list[dict]
    test_rows: list[dict]
    metric: str
    rng_state: tuple  # (python, numpy, torch) right after loading, where training starts from
    templated: bool = False  # rows are (instance, template) renderings (T0), drawn one per instance


def prepare_seed(cfg: Config, task: str, seed: int, merged: Config | None = None) -> SeedSetup:
    """The task's k-shot rows (DataError when the task or its rows are missing), then the seeded model."""
    from mttl.data.fewshot import fewshot_split
    from mttl.data.shards import task_info
    from transformers import set_seed

    merged = merged or checkpoint_finetune_config(cfg)  # what load_for_finetuning merges, without the model
    data_dir = resolve_data_dir(merged)
    info = task_info(data_dir, task)
    train_rows, val_rows, test_rows = fewshot_split(data_dir, task, num_shots(merged, info, seed, task), seed)
    if not train_rows or not val_rows or not test_rows:
        raise DataError(f"task '{task}' in {data_dir} has {len(train_rows)} training, {len(val_rows)} validation and "
                        f"{len(test_rows)} test rows for seed {seed}; every one is needed")
    metric = task_metric(test_rows, info.get("metric"))
    set_seed(seed)
    ft = load_for_finetuning(cfg)
    rng_state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    templated = int(info.get("rows_per_instance") or 1) > 1
    return SeedSetup(ft, train_rows, val_rows, test_rows, metric, rng_state, templated)


def finetune_seed(cfg: Config, task: str, seed: int, *, on_validation: Callable[[dict], None] | None = None,
                  log: Callable[[dict], None] | None = None, setup: SeedSetup | None = None,
                  stop_after_validations: int = 0, on_lap: Callable[[dict], None] | None = None,
                  resume: dict | None = None) -> list[dict]:
    """Fine-tune `task` with one seed; returns its result rows (zero_shot if do_zs, best_val, test).

    `setup` is this seed's `prepare_seed`, when the caller made it earlier. With
    `stop_after_validations` the run stops after that many validations: no test row, and `on_lap`
    gets its state (`lap_state`). `resume` is such a state of the same task, seed and configuration:
    its validations are passed to `on_validation` again, then training goes on from where it stopped,
    with the same batches, random numbers, optimizer and schedule as a run that never stopped."""
    from mttl.data.fewshot import group_instances

    setup = setup or prepare_seed(cfg, task, seed)
    # whatever ran since the setup (writing the run folder, opening loggers), training draws the same numbers
    python_state, numpy_state, torch_state = setup.rng_state
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    torch.random.set_rng_state(torch_state)
    ft, metric = setup.ft, setup.metric
    train_rows, val_rows, test_rows = setup.train_rows, setup.val_rows, setup.test_rows
    model, run_cfg = ft.model, ft.cfg
    base = {"task": task, "seed": seed, "finetune_type": cfg.finetune_type or "Poly"}
    policy = for_model(model, run_cfg.precision)

    def evaluate(rows, evaluation, step, epoch) -> dict:
        scores = evaluate_rows(model, ft.tokenizer, rows, TASK_ID, metric, run_cfg)
        row = {**base, "evaluation": evaluation, "metric": scores["metric"], "value": scores["value"],
               "step": step, "epoch": epoch, **{k: scores[k] for k in SCORE_KEYS if k in scores}}
        if evaluation == "val":  # moves from the first steps, while a score such as exact match is still 0
            row["loss"] = validation_loss(model, ft.tokenizer, rows, run_cfg, policy)
        if log:
            log({"step": step, "seed": seed, f"{evaluation}/{scores['metric']}": scores["value"],
                 **({f"{evaluation}/loss": row["loss"]} if "loss" in row else {})})
        return row

    results = [evaluate(test_rows, "zero_shot", 0, 0)] if run_cfg.do_zs and resume is None else []

    accumulation = max(run_cfg.gradient_accumulation_steps, 1)
    micro_batch = max(run_cfg.train_batch_size // accumulation, 1)
    instances = group_instances(train_rows, setup.templated)
    micro_per_epoch = max(len(instances) // micro_batch, 1)
    steps_per_epoch = max(micro_per_epoch // accumulation, 1)
    if run_cfg.total_steps > 0:
        total_steps = run_cfg.total_steps
    elif run_cfg.num_train_epochs > 0:
        total_steps = run_cfg.num_train_epochs * steps_per_epoch
    else:
        total_steps = DEFAULT_STEPS
    optimizer = build_optimizer(optimizer_groups(model, run_cfg), run_cfg)
    scheduler = build_scheduler(optimizer, run_cfg, total_steps, warmup_steps(run_cfg, total_steps))
    trainable = [p for p in model.parameters() if p.requires_grad]
    scaler = policy.scaler()  # scales fp16 losses so small gradients do not flush to zero; else passes through
    every = 10_000 if run_cfg.finetune_skip_es else eval_every_epochs(run_cfg)

    rng = random.Random(seed)
    step = epoch = micro = validations = 0
    best, best_state = None, None
    reported: list[dict] = []  # the validations passed to on_validation: a lap's state replays them
    if resume is not None:
        check_lap_state(resume, task, seed, total_steps)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in resume["trainable"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        rng.setstate(resume["batch_rng"])
        step, epoch, micro, validations = resume["step"], resume["epoch"], resume["micro"], resume["validations"]
        best, best_state, results = resume["best"], resume["best_state"], list(resume["results"])
        for row in resume["reported"]:
            reported.append(row)
            if on_validation:
                on_validation(row)
        set_rng_state(resume["rng"])  # last: replayed reports must not move training's random numbers
    model.train()
    while step < total_steps:
        epoch += 1
        for batch_rows in _train_batches(instances, micro_batch, rng):
            out = _loss(model, ft.tokenizer, batch_rows, run_cfg, policy)
            scaler.scale(out["loss"] / accumulation).backward()
            micro += 1
            if micro % accumulation:
                continue
            if run_cfg.max_grad_norm:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(trainable, run_cfg.max_grad_norm)
            scaler.step(optimizer)  # under fp16 a step with inf/nan gradients is skipped
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if log and step % run_cfg.log_every == 0:
                log({"step": step, "seed": seed, "epoch": epoch,
                     **{f"train/{k}": v.item() for k, v in out.items()}, "train/lr": scheduler.get_last_lr()[0]})
            if step >= total_steps:
                break
        at_end = step >= total_steps and (run_cfg.finetune_skip_es or validations == 0)
        if epoch % every == 0 or at_end:
            row = evaluate(val_rows, "val", step, epoch)
            validations += 1
            reported.append({**row, "validation": validations})
            if on_validation:
                on_validation(reported[-1])
            if best is None or row["value"] > best["value"]:
                best = row
                if not run_cfg.finetune_skip_es:
                    best_state = _trainable_state(model)
            # a lap that reaches the end is kept too: continuing it only tests the best validation weights
            if stop_after_validations and validations >= stop_after_validations:
                if on_lap:
                    on_lap({"task": task, "seed": seed, "total_steps": total_steps, "step": step, "epoch": epoch,
                            "micro": micro, "validations": validations, "best": best, "best_state": best_state,
                            "results": results, "reported": reported, "trainable": _trainable_state(model),
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(), "batch_rng": rng.getstate(), "rng": get_rng_state()})
                return [*results, {**best, "evaluation": "best_val", "trained_steps": step}]
    results.append({**best, "evaluation": "best_val", "trained_steps": step})
    tested_step, tested_epoch = step, epoch
    if best_state is not None:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in best_state.items():
                params[name].copy_(value)
        tested_step, tested_epoch = best["step"], best["epoch"]
    results.append(evaluate(test_rows, "test", tested_step, tested_epoch))
    return results


def run_finetune(cfg: Config) -> Path:
    """Every seed of `finetune_task_name`; returns the run folder holding the results.

    Rows already in the folder's results.jsonl are kept: a rerun of the same run_name skips the
    seeds whose test row for this task and finetune type is there (an interrupted run resumes).
    """
    from mttl.device import backbone_dtype, check_precision, resolve_device
    from mttl.tracking import MetricsLogger

    from mttl.finetune.fanout import requested_tasks, run_finetune_tasks
    from mttl.console import hide_progress_bars

    hide_progress_bars(cfg.verbose)
    names = requested_tasks(cfg)
    if names is not None:
        return run_finetune_tasks(cfg, names)
    task = cfg.finetune_task_name
    if not task:
        raise ConfigError("set the held-out task to adapt to: -k finetune_task_name=TASK")
    # use_gpu=True without a GPU, precision=16 on CPU, a backbone_dtype that does not fit: one line, first
    check_precision(cfg.precision, resolve_device(cfg))
    backbone_dtype(cfg)
    run_dir = run_dir_for(cfg, "finetune")
    merged = checkpoint_finetune_config(cfg)
    kind = cfg.finetune_type or "Poly"
    run_uri = remote_run_for(cfg, "finetune")  # output_dir in a bucket: rows read from it, uploaded after each seed
    pull_run(run_dir, run_uri)
    rows = read_results(run_dir)
    done = {r["seed"] for r in rows if (r["task"], r["finetune_type"], r["evaluation"]) == (task, kind, "test")}
    rows = [r for r in rows if (r["task"], r["finetune_type"]) != (task, kind) or r["seed"] in done]
    pending = [seed for seed in default_seeds(merged) if seed not in done]
    # Unknown task, missing rows, unreadable checkpoint, keys that do not fit it: all fail here,
    # before the run folder is created or touched (the first seed's setup is then used, not redone).
    setup = prepare_seed(cfg, task, pending[0], merged) if pending else None
    merged.save(run_dir)
    with MetricsLogger(run_dir, merged) as logger:
        for seed in pending:
            rows += finetune_seed(cfg, task, seed, log=logger.log, setup=setup)
            setup = None
            write_results(run_dir, rows)
            push_run(run_dir, run_uri)
    return run_dir
