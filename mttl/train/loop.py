"""Pre-training: the driver that sets up a run folder and Ray Train, and the per-worker loop.

`pretrain(cfg)` resolves the data and task table, creates or resumes `$output_dir/$run_name/`,
builds the Ray Data inputs and runs `TorchTrainer` (checkpoints go to the same folder through
`ray.train.report`; failures restart from the last one up to `max_failures`).
`train_loop_per_worker` runs on every worker: one DeepSpeed engine with the client optimizer and
scheduler, the training steps, periodic validation (overall and per task), metrics (rank 0),
checkpoints, and at the end `final/` (adapters, plus the backbone when it was trained or built
from a config). Starting from a `checkpoint` run and annealing routing to uniform are owned by
`mttl.train.continuation`; the loop calls it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mttl.config import Config
from mttl.data.locate import resolve_data_dir
from mttl.data.stream import LABEL_PAD
from mttl.errors import ConfigError, DataError, MttlError, set_interrupt_hint
from mttl.models.run import build_routed_model, check_model_config, read_tasks_file
from mttl import storage
from mttl.run_folder import (BACKBONE_DIR, CONFIG_FILE, FINAL_DIR, LOGS_DIR, METRICS_FILE, RUN_FILES, TASKS_FILE,
                             TRACKING_FILE, atomic_write_text, pull_run, push_run, remote_run_for, run_dir_for)
from mttl.train.checkpoint import (CHECKPOINT_SNAPSHOT, TrainerState, check_resume, load_checkpoint,
                                   save_backbone_shards,
                                   older_bucket_checkpoints, older_checkpoints, registered_checkpoints,
                                   save_adapter_tensors, save_checkpoint, usable_checkpoint)
from mttl.train.continuation import (check_checkpoint_tasks, continuation_config, start_from_checkpoint,
                                     uniform_alpha)
from mttl.train.ds_ops import import_deepspeed, prepare_comm_op
from mttl.train.deepspeed_config import (deepspeed_config, largest_layer_params, micro_batch_size, offload_sections,
                                         save_group_numel, zero3_gather_limits)
from mttl.train.optim import build_optimizer, build_scheduler, optimizer_groups, warmup_steps
from mttl.train.zero_memory import release_optimizer_states, return_freed_heap, share_fp32_partition


# --------------------------------------------------------------------------------------- driver
def task_rows(data_dir: str, cfg: Config, roles: list[str]) -> dict[str, int]:
    from mttl.data.shards import read_manifest
    from mttl.data.stream import select_tasks, task_table

    names = cfg.tasks
    if cfg.custom_tasks_splits:
        path = Path(cfg.custom_tasks_splits)
        if not path.is_file():
            raise ConfigError(f"custom_tasks_splits file '{path}' does not exist; "
                              "give a file with one task name per line")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    tasks = select_tasks(read_manifest(data_dir, verify=True), roles=roles, names=names)
    return dict(task_table(tasks))


def prepare_run_dir(cfg: Config, tasks: dict[str, int], run_uri: str | None = None) -> Path:
    """Create the run folder, or check that an existing one may be continued under `cfg`. With `run_uri`
    (output_dir in object storage) the run folder's files are copied down into this machine's copy
    first, and config.json and tasks.json go up once written."""
    run_dir = run_dir_for(cfg, "pretrain")
    pull_run(run_dir, run_uri, [*RUN_FILES, CHECKPOINT_SNAPSHOT])
    saved_config = run_dir / CONFIG_FILE
    if saved_config.is_file():
        check_resume(Config.load(saved_config), cfg, saved_config)
        saved_tasks = read_tasks_file(run_dir)
        if saved_tasks != tasks:
            raise ConfigError(f"run folder {run_uri or run_dir} was trained on other tasks "
                              f"({len(saved_tasks)} in {TASKS_FILE}); "
                              "use the same data and tasks or a new run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / TASKS_FILE, json.dumps(tasks, indent=2, sort_keys=True) + "\n")
    cfg.save(run_dir)
    push_run(run_dir, run_uri, [CONFIG_FILE, TASKS_FILE])
    return run_dir


def pretrain(cfg: Config, roles: tuple[str, ...] = ("train",)) -> Path:
    """Run (or resume) one pre-training phase on the tasks of `roles`; returns the run folder."""
    from mttl.models.tokenizer import load_tokenizer
    from mttl.device import check_before_ray, cluster_uses_gpu
    from mttl.ray_utils import (check_reachable_cluster, init_ray, resources_per_worker, run_in_background,
                                train_timeouts, worker_env)

    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from mttl.data.stream import DatasetPerAttempt, data_config
    from mttl.train.process_group import LocalTorchConfig

    if not cfg.run_name:
        raise ConfigError("run_name is not set; pass -k run_name=NAME")
    if cfg.total_steps <= 0:
        raise ConfigError("total_steps must be set for pre-training; example: -k total_steps=1000")
    # a `checkpoint` run supplies the model, adapter and data keys left unset
    cfg = continuation_config(cfg)
    if not cfg.model:
        raise ConfigError("model is not set; pass a hub name, a local folder or -k model=tiny-t5")
    micro_batch_size(cfg, cfg.num_workers)  # fail on bad batch arithmetic before starting Ray
    offload_sections(cfg)  # an offload its ZeRO stage cannot do, before starting Ray
    check_before_ray(cfg, deepspeed=True)  # use_gpu=True without GPUs, a backbone_dtype that cannot hold
    cfg = cfg.copy()
    if storage.is_uri(cfg.output_dir):
        cfg.output_dir = cfg.output_dir.rstrip("/")
        storage.check_reachable(cfg.output_dir)  # no bucket, no credentials: one line before anything starts
    else:
        cfg.output_dir = os.path.abspath(cfg.output_dir)
    data_dir = resolve_data_dir(cfg)  # a data_dir URI: this machine's copy of it, in cache_dir
    source = cfg.resolved_data_dir()
    cfg.data_dir = source if storage.is_uri(source) else data_dir  # config.json names the bucket, not the copy
    tasks = task_rows(data_dir, cfg, list(roles))
    cfg.n_tasks = len(tasks)
    check_checkpoint_tasks(cfg, tasks)
    check_model_config(cfg, load_tokenizer(_tokenizer_spec(cfg), cache_dir=cfg.cache_dir))
    check_reachable_cluster(cfg)
    run_uri = remote_run_for(cfg, "pretrain")
    run_dir = prepare_run_dir(cfg, tasks, run_uri)
    if run_uri is None:  # in a bucket, Ray Train's own pruning applies (listing every object would not scale)
        prune_unregistered_checkpoints(run_dir)
    finished = (storage.exists(storage.join(run_uri, FINAL_DIR, storage.COMPLETE)) if run_uri
                else (run_dir / FINAL_DIR).is_dir())
    if finished and latest_checkpoint_step(run_dir) == cfg.total_steps:
        print(f"[mttl] {run_uri or run_dir} already finished {cfg.total_steps} steps; raise total_steps to "
              "continue it")
        return run_dir

    from mttl import console

    where = console.send_internal_logs_to(console.default_log_path(cfg.output_dir, run_dir), verbose=cfg.verbose)
    init_ray(cfg)
    if where is not None:
        print(f"[mttl] Ray's and DeepSpeed's own logs: {where} (-k verbose=True shows them here)")
    # auto → GPU workers when the cluster has GPUs; True on a cluster without any fails here, before workers
    cfg.use_gpu = cluster_uses_gpu(cfg)
    # the console carries one progress line per log interval, not Ray Data's bars
    ray.data.DataContext.get_current().enable_progress_bars = False
    # no validation split is built (or read) for a run that never validates
    splits = ("train", "validation") if cfg.eval_every else ("train",)
    # a bucket: Ray Train's checkpoints go there through a filesystem that carries the environment's
    # credentials to the workers (pickled with the trainer, never written to config.json or a log)
    storage_fs, storage_path = storage.filesystem(cfg.output_dir) if run_uri else (None, cfg.output_dir)
    datasets = {split: DatasetPerAttempt(_dataset(cfg, split, tasks), functools.partial(_dataset, cfg, split, tasks))
                for split in splits}
    trainer = TorchTrainer(
        train_loop_per_worker,
        # loopback-only process group on a local cluster; collectives time out instead of hanging
        torch_config=LocalTorchConfig(timeout_s=int(cfg.collective_timeout_s)),
        train_loop_config={"cfg": cfg.to_dict(), "overridden": sorted(cfg._overridden), "tasks": tasks,
                           "run_dir": str(run_dir), "run_uri": run_uri, "storage_fs": storage_fs},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources_per_worker(cfg)),
        run_config=ray.train.RunConfig(
            name=cfg.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep),
            # a worker group that cannot start counts against the same budget as a failed worker, so a
            # request no node can meet ends the run (ray's default retries it forever)
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures,
                                                   controller_failure_limit=cfg.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg)}),
        datasets=datasets,
        # validation is split too: each rank scores its part and the sums are all-reduced
        dataset_config=data_config(splits),
    )
    set_interrupt_hint(f"the checkpoints of {run_uri or run_dir} are kept; run the same command again to resume")
    try:
        with train_timeouts(cfg):
            run_in_background(trainer.fit)
    except ray.train.WorkerGroupError as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        raise user_error from None
    except ray.train.ControllerError as err:
        raise _controller_error(err, cfg) from None
    finally:
        _upload_logs(run_dir, run_uri)
    return run_dir


def _upload_logs(run_dir: Path, run_uri: str | None) -> None:
    """A bucket run's logs/ (this driver's copy: Ray's and DeepSpeed's own lines) uploaded beside it, also
    after a failure; a bucket that cannot take them costs one line, never the run's own error."""
    if run_uri is None or not (run_dir / LOGS_DIR).is_dir():
        return
    try:
        storage.upload_folder(run_dir / LOGS_DIR, storage.join(run_uri, LOGS_DIR), marker=None, replace=False)
    except MttlError as err:
        print(f"[mttl] the logs stay in {run_dir / LOGS_DIR}: {err}", file=sys.stderr)


def _controller_error(err, cfg: Config) -> MttlError:
    """Ray Train's controller giving up (workers that never got their resources) as one line."""
    import ray

    text = str(err)
    if "startup timed out" not in text:
        first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)
        return MttlError(f"Ray Train stopped the run: {first}")
    wanted = resources_per_worker_text(cfg)
    have = {k: (f"{v / 2**30:.1f} GiB" if k == "memory" else v) for k, v in ray.cluster_resources().items()
            if k in ("CPU", "GPU", "memory")}
    return ConfigError(f"the {cfg.num_workers} training workers did not get {wanted} each within "
                       f"worker_start_timeout_s={cfg.worker_start_timeout_s:g} s (the cluster has {have}); "
                       "lower resources_per_worker / num_workers, check use_gpu, or raise worker_start_timeout_s "
                       "for an autoscaling cluster")


def resources_per_worker_text(cfg: Config) -> str:
    from mttl.ray_utils import resources_per_worker

    return str(resources_per_worker(cfg))


def _user_error(err) -> MttlError | None:
    """A worker's own MttlError (bad data, bad key), so the CLI reports it as one line."""
    for failure in err.worker_failures.values():
        failure = getattr(failure, "_base_exc", failure)  # Ray Train wraps it with its traceback text
        if isinstance(failure, MttlError):
            return type(failure)(str(failure))
    return None


def latest_checkpoint_step(run_dir: Path) -> int:
    """The step of the newest checkpoint Ray Train registered in the run folder (0 when none)."""
    return max([0] + [step for step, _ in registered_checkpoints(run_dir)])


def prune_unregistered_checkpoints(run_dir: Path) -> None:
    """Remove checkpoint folders Ray Train never registered (written while its driver died).

    Such a folder may miss some ranks' files, and Ray Train neither resumes from it nor prunes it,
    so it would only fill the disk.
    """
    if not (run_dir / CHECKPOINT_SNAPSHOT).is_file():
        return
    registered = {folder.name for _, folder in registered_checkpoints(run_dir)}
    for folder in sorted(run_dir.glob("checkpoint_*")):
        if folder.is_dir() and folder.name not in registered:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"[mttl] removed {folder.name}: written after its driver stopped, never registered by Ray Train",
                  flush=True)


def _dataset(cfg: Config, split: str, tasks: dict[str, int]):
    from mttl.data.stream import reuse_or_build_dataset

    source_uri = cfg.data_dir if storage.is_uri(cfg.data_dir) else None  # Ray Data reads the bucket itself
    return reuse_or_build_dataset(resolve_data_dir(cfg), split=split, tasks=list(tasks), task_to_row=tasks,
                                  tokenizer_spec=_tokenizer_spec(cfg), max_input_length=cfg.max_input_length,
                                  max_output_length=cfg.max_output_length,
                                  mixing=cfg.task_mixing if split == "train" else "proportional",
                                  mixing_cap=cfg.mixing_cap, mixing_temperature=cfg.mixing_temperature, seed=cfg.seed,
                                  source_uri=source_uri)


def _tokenizer_spec(cfg: Config) -> str:
    from mttl.models.tokenizer import BYTE, CONFIG_BUILT_MODELS

    if cfg.tokenizer:
        return cfg.tokenizer
    return BYTE if cfg.model in CONFIG_BUILT_MODELS else cfg.model


# --------------------------------------------------------------------------------------- worker
def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train

    deepspeed = import_deepspeed()

    from mttl.data.stream import bounded_waits, iter_epoch
    from mttl.device import backbone_dtype
    from mttl.models.tokenizer import load_tokenizer

    cfg = Config().update(loop_config["cfg"], source="run config")
    cfg._overridden = set(loop_config["overridden"])
    tasks: dict[str, int] = loop_config["tasks"]
    run_dir = Path(loop_config["run_dir"])
    run_uri, storage_fs = loop_config.get("run_uri"), loop_config.get("storage_fs")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    prepare_comm_op()  # a killed worker's leftover build lock would otherwise hang this one for good
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(_tokenizer_spec(cfg), cache_dir=cfg.cache_dir)
    ds_config = deepspeed_config(cfg, world)
    # ZeRO-3: partitioned as it is built, never whole in any worker
    model = build_routed_model(cfg, tokenizer, dtype=backbone_dtype(cfg),
                               zero3_config=ds_config if cfg.zero_stage == 3 else None)
    memory = {"after_build": _memory_now()}
    if cfg.checkpoint:
        # before the optimizer: switching to average routing removes the routing parameters
        start_from_checkpoint(model, cfg)
    if cfg.zero_stage == 3:
        _match_partitioned_dtype(model, cfg)
        if not cfg.zero3_live_parameters:  # the default depends on the model: twice its largest layer
            ds_config["zero_optimization"].update(zero3_gather_limits(cfg, largest_layer_params(model)))
    optimizer = build_optimizer(optimizer_groups(model, cfg), cfg)
    group_names = [g.get("name", str(i)) for i, g in enumerate(optimizer.param_groups)]

    checkpoint = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        resume_from, state, damaged = None, TrainerState(warmup_steps=warmup_steps(cfg, cfg.total_steps)), []
        if checkpoint is not None:
            latest = Path(stack.enter_context(checkpoint.as_directory()))
            # a bucket's checkpoint is downloaded into one folder per node, under a lock that a rank
            # arriving after the first download takes again and downloads anew, overwriting files that
            # rank is reading (Ray 2.60's `Checkpoint.to_directory`): a resumed run read a truncated
            # model_states.pt. Nobody reads until every rank's download is done.
            torch.distributed.barrier()
            # in a bucket an older checkpoint is downloaded only once every newer one was found damaged
            # (a bucket's latest checkpoint is a local copy under another name: its own name is in its path)
            latest_name = Path(checkpoint.path).name
            older = (older_checkpoints(run_dir, latest) if run_uri is None else older_bucket_checkpoints(
                run_uri, latest_name, Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mttl-fallback-"))),
                storage_fs))
            where = str if run_uri is None else (  # damaged ones named by their URI, not the local copy
                lambda folder: storage.join(run_uri, latest_name if folder == latest else folder.name))
            resume_from, state, damaged = usable_checkpoint(itertools.chain([latest], older), rank, where=where)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: build_scheduler(opt, cfg, cfg.total_steps, state.warmup_steps))
        share_fp32_partition(engine)  # before a step or a load: the optimizer then steps the partition itself
        return_freed_heap()
        if resume_from is not None:
            state = load_checkpoint(engine, resume_from)
            if rank == 0:
                print(f"[mttl] resumed {cfg.run_name} at step {state.step}/{cfg.total_steps}", file=sys.__stdout__,
                      flush=True)

    # on a GPU, what the engine holds before the first batch: weights and fp32 master copies (gradient
    # buffers and Adam's moments come with the first step: see `gpu_states_after_first_step_gb`)
    on_gpu = _collective_device().type == "cuda"
    memory["after_initialize"] = _memory_now()
    # where a worker's memory goes, per stage (resident now and its high-water mark; the largest over ranks)
    memory_row = {f"{kind}_{stage}_gb": _max_over_ranks(value) / 1e9
                  for stage, values in memory.items() for kind, value in values.items()}
    if on_gpu:
        memory_row["gpu_model_states_gb"] = _max_over_ranks(torch.cuda.memory_allocated()) / 1e9
    logger = None
    if rank == 0:
        from mttl.tracking import MetricsLogger

        if run_uri is not None:  # this worker's copy of the run's rows, appended to, then uploaded whole
            run_dir.mkdir(parents=True, exist_ok=True)
            storage.pull(run_uri, run_dir, [METRICS_FILE, TRACKING_FILE], storage_fs)
        logger = MetricsLogger(run_dir, cfg)
        logger.log({"step": state.step, **memory_row})
        if resume_from is not None:
            # steps after this one may appear twice in metrics.jsonl: once before a failure, once after
            # the run's record says when it fell back past a damaged checkpoint, not only the console
            logger.log({"step": state.step, "resumed_from_step": state.step,
                        **({"skipped_damaged_checkpoints": damaged} if damaged else {})})
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation") if cfg.eval_every else None
    micro = micro_batch_size(cfg, world)
    pad_id = tokenizer.pad_token_id
    meta = {"tasks": tasks, "run_name": cfg.run_name}
    row_to_task = {row: name for name, row in tasks.items()}

    def evaluate() -> dict:
        batches = iter_epoch(val_shard, batch_size=cfg.predict_batch_size, epoch=0, seed=cfg.seed, pad_id=pad_id,
                             skip_batches=0)
        return validation_losses(engine, bounded_waits(batches, cfg.data_timeout_s,
                                                       f"a validation batch of run {cfg.run_name} (worker {rank})"),
                                 len(tasks), row_to_task)

    def checkpoint_and_report(metrics: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="mttl-ckpt-") as folder:
            save_checkpoint(engine, engine.module, folder, state, cfg, meta, rank)
            torch.distributed.barrier()
            ray.train.report({**metrics, "step": state.step},
                             checkpoint=ray.train.Checkpoint.from_directory(folder))
        if rank == 0:  # the rows up to this checkpoint reach the bucket with it
            push_run(run_dir, run_uri, [METRICS_FILE, TRACKING_FILE], storage_fs)

    window = _Window()
    start_step, started = state.step, time.perf_counter()
    console = ConsoleSchedule(start_step, cfg.total_steps)
    # a function of the step alone, so a resumed run anneals exactly as an uninterrupted one
    alpha = set_alpha(engine.module, cfg, state.step, 1.0)
    engine.train()
    while state.step < cfg.total_steps:
        batches = bounded_waits(iter_epoch(train_shard, batch_size=micro, epoch=state.epoch, seed=cfg.seed,
                                           pad_id=pad_id, skip_batches=state.batches_in_epoch),
                                cfg.data_timeout_s, f"a training batch of run {cfg.run_name} (worker {rank}, "
                                f"epoch {state.epoch})")
        consumed_any = False
        wait_from = time.perf_counter()
        for batch in batches:
            consumed_any = True
            window.data_wait_s += time.perf_counter() - wait_from
            # routing samples and dropout drawn from (seed, rank, position): a resumed run draws
            # exactly what the uninterrupted one would have
            torch.manual_seed(step_seed(cfg.seed, rank, state.epoch, state.batches_in_epoch))
            # Hugging Face T5 shifts `labels` right into the decoder inputs; -100 labels are ignored
            loss = engine(**_on_device(batch, engine.device)).loss
            first_step = state.step == start_step  # its high-water mark by phase: where a worker's peak comes from
            if first_step:
                phase_peaks = {"forward": _peak_rss_bytes()}
            engine.backward(loss)
            if first_step:
                phase_peaks["backward"] = _peak_rss_bytes()
            at_boundary = engine.is_gradient_accumulation_boundary()
            if first_step and at_boundary:
                # the activations the backward just freed are small tensors from the heap, left between
                # live ones where glibc keeps their pages; the first optimizer step then made Adam's
                # states on top of them (the first step's high-water mark of a T5-large-shaped ZeRO-3
                # worker: 4.61 GB, 4.08 with this). Given back first, the states take their place.
                return_freed_heap()
            engine.step()
            if first_step:
                phase_peaks["optimizer_step"] = _peak_rss_bytes()
            state.batches_in_epoch += 1
            window.add(loss.detach(), _token_count(batch))
            if at_boundary:
                state.step += 1
                if state.step == start_step + 1:
                    return_freed_heap()  # the first step's setup (Adam's states, gradient buckets) freed some
                    # all of `mttl plan`'s model states exist now; activations are freed after backward
                    window.first_step_memory = {f"{kind}_after_first_step_gb": _max_over_ranks(value) / 1e9
                                                for kind, value in _memory_now().items()}
                    window.first_step_memory.update({f"peak_rss_after_{phase}_gb": _max_over_ranks(value) / 1e9
                                                     for phase, value in phase_peaks.items()})
                    if on_gpu:
                        window.first_step_memory["gpu_states_after_first_step_gb"] = (
                            _max_over_ranks(torch.cuda.memory_allocated()) / 1e9)
                # set after the step, as the reference's on_train_batch_end: validation at this step
                # and the next step's batches use it
                alpha = set_alpha(engine.module, cfg, state.step, alpha)
                window.steps += 1
                row = None
                will_save = (cfg.save_every and state.step % cfg.save_every == 0) or state.step == cfg.total_steps
                if state.step % cfg.log_every == 0 or will_save:
                    # every rank sees the same reduced loss, so every rank stops at the same step and
                    # a non-finite state never reaches a checkpoint
                    row = window.reduce(state.step, optimizer, group_names)
                    if cfg.uniform_interp_steps:
                        row["uniform_alpha"] = alpha
                    if not math.isfinite(row["loss"]):
                        raise ConfigError(
                            f"run {cfg.run_name}: the training loss became {row['loss']} by step {state.step} "
                            f"(after step {state.step - window.steps}); lower learning_rate / "
                            "adapters_learning_rate or check the data, then run again (checkpoints before it are kept)")
                    if rank == 0:
                        logger.log(row)
                        if console.due(state.step):
                            _print_progress(row, cfg.total_steps, start_step, started)
                    window = _Window()
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    val = {"step": state.step, **evaluate()}
                    if rank == 0:
                        logger.log(val)
                    engine.train()
                    row = {**(row or {}), **val}
                if will_save:
                    checkpoint_and_report({k: v for k, v in (row or {}).items() if isinstance(v, (int, float))})
                if state.step >= cfg.total_steps:
                    break
            wait_from = time.perf_counter()
        else:
            if not consumed_any:
                raise DataError(f"the training data of run {cfg.run_name} is empty for worker {rank}; "
                                "check data_dir and tasks")
            state.epoch += 1
            state.batches_in_epoch = 0
    if cfg.eval_every and cfg.total_steps % cfg.eval_every and start_step < cfg.total_steps:
        val = {"step": state.step, **evaluate()}
        if rank == 0:
            logger.log(val)
    release_optimizer_states(engine)  # the last checkpoint holds them; writing final/ gathers
    write_final(engine, cfg, tokenizer, run_dir, meta, rank)
    # the high-water mark again, now with writing final/ (ZeRO-3 gathers the adapters, and a trained
    # backbone group by group): the training rows were logged before it
    final_peak = _max_over_ranks(_peak_rss_bytes()) / 1e9
    if logger is not None:
        logger.log({"step": state.step, "peak_rss_final_gb": final_peak})
        logger.close()
    if rank == 0 and run_uri is not None:  # final/ uploaded with its marker last, then the last rows
        storage.upload_folder(run_dir / FINAL_DIR, storage.join(run_uri, FINAL_DIR), fs=storage_fs)
        push_run(run_dir, run_uri, [METRICS_FILE, TRACKING_FILE], storage_fs)


def set_alpha(model, cfg: Config, step: int, current: float) -> float:
    """Routing's interpolation factor towards uniform after `step` steps, set on the model when it changed."""
    alpha = uniform_alpha(step, cfg.total_steps, cfg.uniform_interp_steps)
    if alpha != current:
        from mttl.adapters.ops import set_uniform_interpolation

        set_uniform_interpolation(model, alpha)
    return alpha


def step_seed(seed: int, rank: int, epoch: int, batch_in_epoch: int) -> int:
    """The torch seed of one micro batch; distinct per rank and position, the same on resume."""
    return (seed * 1_000_003 + rank * 7_919 + epoch * 1_000_000_007 + batch_in_epoch) % (2**63 - 1)


class _Window:
    """Loss, token and timing sums since the last logged row, on this rank."""

    def __init__(self):
        self.loss_sum = torch.zeros(())
        self.micro_batches = 0
        self.tokens = 0
        self.steps = 0
        self.data_wait_s = 0.0
        self.first_step_memory = {}  # memory after this process's first step, logged with the window
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss_sum += loss.float().cpu()
        self.micro_batches += 1
        self.tokens += tokens

    def reduce(self, step: int, optimizer, group_names: list[str]) -> dict:
        """A metrics row averaged over ranks (a collective: every rank calls it at the same step)."""
        elapsed = time.perf_counter() - self.started
        totals = torch.tensor([float(self.loss_sum), self.micro_batches, self.tokens, self.data_wait_s],
                              dtype=torch.float64, device=_collective_device())
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()
        world = torch.distributed.get_world_size()
        steps = max(self.steps, 1)
        row = {"step": step, "loss": float(totals[0] / max(totals[1], 1)),
               "tokens_per_s": float(totals[2]) / elapsed, "step_time_s": elapsed / steps,
               "data_wait_s": float(totals[3]) / world / steps}
        # the largest resident set any worker process reached so far (what must fit in a node's RAM)
        row["peak_rss_gb"] = _max_over_ranks(_peak_rss_bytes()) / 1e9
        row.update(self.first_step_memory)
        if _collective_device().type == "cuda":  # and what must fit in a GPU's memory
            row["peak_gpu_gb"] = _max_over_ranks(torch.cuda.max_memory_allocated()) / 1e9
        for name, group in zip(group_names, optimizer.param_groups):
            row[f"lr/{name}"] = group["lr"]
        return row


def _max_over_ranks(value: float) -> float:
    """The largest of one number per rank (a collective)."""
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.cpu()[0])


def _memory_now() -> dict[str, int]:
    """This worker's resident set now (`rss`) and its high-water mark so far (`peak_rss`), in bytes."""
    import psutil

    return {"rss": psutil.Process().memory_info().rss, "peak_rss": _peak_rss_bytes()}


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _match_partitioned_dtype(model, cfg: Config) -> None:
    """Adapters and routing logits (built whole, in fp32) in the engine's half precision under ZeRO-3.

    DeepSpeed casts a module it received whole to bf16/fp16 itself, but not one built partitioned by
    zero.Init, and its ZeRO-3 partitions require one dtype per group. The cast is in place (same
    Parameter objects); the fp32 master copies the optimizer steps on are DeepSpeed's, as before.
    """
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(str(cfg.precision))
    if dtype is None:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != dtype and not hasattr(tensor, "ds_id"):
            tensor.data = tensor.data.to(dtype)


class ConsoleSchedule:
    """When a logged step also gets a console line: the first (an early ETA), then every fifth of
    the run, at least every ten minutes, and the last step. metrics.jsonl and TensorBoard get every
    `log_every` row; the console gets a readable handful per run whatever its length."""

    def __init__(self, start_step: int, total: int, fraction: float = 0.2, max_seconds: float = 600.0):
        self.total, self.every = total, max(1, round(total * fraction))
        self.next_step, self.max_seconds, self.last = start_step + 1, max_seconds, time.monotonic()

    def due(self, step: int) -> bool:
        if step < self.next_step and step < self.total and time.monotonic() - self.last < self.max_seconds:
            return False
        while self.next_step <= step:
            self.next_step += self.every
        self.last = time.monotonic()
        return True


def _print_progress(row: dict, total: int, start_step: int, started: float) -> None:
    done = row["step"] - start_step
    eta = (time.perf_counter() - started) / max(done, 1) * (total - row["step"])
    # the process's own stdout: Ray Train's print patch would both log and echo the line
    print(f"[mttl] step {row['step']}/{total}  loss {row['loss']:.4f}  {row['tokens_per_s']:,.0f} tokens/s  "
          f"ETA {_duration(eta)}", file=sys.__stdout__, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _on_device(batch: dict, device) -> dict:
    """A collated batch (CPU tensors from Ray Data) on the engine's device; DeepSpeed does not move inputs."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _collective_device() -> torch.device:
    """Where a tensor must live for this process group's collectives: NCCL reduces only GPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _token_count(batch: dict) -> int:
    """Non-pad input and target tokens of a collated micro batch."""
    return int(batch["attention_mask"].sum() + (batch["labels"] != LABEL_PAD).sum())


@torch.no_grad()
def validation_losses(engine, batches, n_rows: int, row_to_task: dict[int, str]) -> dict:
    """Token-averaged validation loss overall and per task, summed over every rank's shard.

    A collective: every rank calls it with its own shard of the validation split.
    """
    engine.eval()
    sums = torch.zeros(n_rows, dtype=torch.float64, device=engine.device)
    counts = torch.zeros(n_rows, dtype=torch.float64, device=engine.device)
    for batch in batches:
        batch = _on_device(batch, engine.device)
        # Hugging Face T5 shifts `labels` right into the decoder inputs
        logits = engine(**batch).logits.float()
        token_loss = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=LABEL_PAD,
                                     reduction="none")
        tokens = (batch["labels"] != LABEL_PAD).sum(dim=1).double()
        rows = batch["task_ids"].long()
        sums.index_add_(0, rows, token_loss.sum(dim=1).double())
        counts.index_add_(0, rows, tokens)
    torch.distributed.all_reduce(sums)
    torch.distributed.all_reduce(counts)
    sums, counts = sums.cpu(), counts.cpu()
    out = {"val_loss": float(sums.sum() / counts.sum().clamp(min=1))}
    for row in torch.nonzero(counts).flatten().tolist():
        out[f"val_loss/{row_to_task[row]}"] = float(sums[row] / counts[row])
    return out


def write_final(engine, cfg: Config, tokenizer, run_dir: Path, meta: dict, rank: int) -> None:
    """`final/`: adapters (gathered under ZeRO-3), and the backbone when it was trained or built here.

    Written into a temporary sibling and renamed, so an existing `final/` stays whole until then.
    """
    from mttl.models.tokenizer import CONFIG_BUILT_MODELS

    model = engine.module
    staging = run_dir / f".{FINAL_DIR}.tmp"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    torch.distributed.barrier()
    group_numel = save_group_numel(cfg, model) if cfg.zero_stage == 3 else None  # partitioned: a group at a time
    if cfg.model_modifier:
        save_adapter_tensors(model, staging, meta, cfg.zero_stage, rank, group_numel)
    backbone_trained = cfg.model_modifier is None or cfg.model in CONFIG_BUILT_MODELS
    if backbone_trained and cfg.zero_stage == 3:
        save_backbone_shards(model, tokenizer, staging / BACKBONE_DIR, group_numel, rank)
    elif backbone_trained and rank == 0:
        model.hf_model.save_pretrained(staging / BACKBONE_DIR)
        tokenizer.save_pretrained(staging / BACKBONE_DIR)
    torch.distributed.barrier()
    if rank == 0:
        final = run_dir / FINAL_DIR
        if final.exists():
            old = run_dir / f".{FINAL_DIR}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old)
        else:
            os.replace(staging, final)
