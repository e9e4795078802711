"""Streaming prepared shards into Ray Train workers: task selection, tokenization, mixing, batches.

Owns the path from a prepared folder (`shards.py` layout) to padded torch batches on each worker:

    select_tasks(manifest) → task_table(tasks) → build_dataset(...)      (driver, once per run)
    TorchTrainer(datasets={"train": ds}, dataset_config=data_config())   (driver)
    for batch in iter_epoch(ray.train.get_dataset_shard("train"), ...)   (each worker, each epoch)

`build_dataset` reads the shards with `ray.data.read_parquet`, keeps one split of the chosen
tasks, mixes the tasks (each task contributes a seeded sample or upsample of its rows, see
`mixing_counts`), tokenizes in `map_batches` tasks, shuffles globally by seed and materializes:
tokenization happens once per run, never per epoch, and while the workers train no Ray Data
task needs a CPU (on 2 CPUs with 2 train workers that is what keeps ingest from stalling).

`data_config()` splits the training dataset evenly across workers in a fixed order (order
preserved, no locality preference), so each worker gets the same rows on every run with the
same cluster shape. `iter_epoch` shuffles within a window seeded by `seed + epoch`: the order is
the same for the same (seed, epoch) and differs across epochs, and `skip_batches` lets a resumed
run continue from the batch it had reached. `batches_per_epoch` gives the per-worker batch count
the trainer needs for step arithmetic.

A materialized dataset loses the blocks that lived on a node when the node goes, and Ray cannot
recompute them (Ray Data has freed the shuffle's inputs): restarted workers would wait on them
until the fetch times out. `DatasetPerAttempt` is what the trainer is given instead of the
dataset: Ray Train calls it at every worker-group start, and after a node loss it builds the
dataset again (same seed, so the same rows in the same order).

`reuse_or_build_dataset` keeps the last dataset built per split in this driver: a driver that runs
several phases or resumes on the same data and cluster (the quick start, a study, a retried run in
a notebook) tokenizes and shuffles it once.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from mttl.data.shards import read_manifest, read_rows
from mttl.errors import ConfigError, DataError

MIXING = ("proportional", "uniform", "temperature")
LABEL_PAD = -100  # ignored by the cross-entropy of Hugging Face seq2seq models
OUTPUT_SCHEMA = pa.schema([
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("labels", pa.list_(pa.int32())),
    pa.field("task_ids", pa.int64()),
])
_READ_COLUMNS = ["task_name", "split", "instance_id", "source", "target"]


def select_tasks(manifest: dict, *, roles: Iterable[str] = ("train",), names: Iterable[str] | None = None) -> list[str]:
    """Sorted task names: `names` when given (each must be in the manifest), else all with a role in `roles`."""
    known = manifest["tasks"]
    if names is not None:
        names = set(names)
        unknown = sorted(names - set(known))
        if unknown:
            raise DataError(f"task(s) {unknown} are not in the prepared data (it has {len(known)} tasks, "
                            f"e.g. {sorted(known)[:5]}); fix -k tasks=[...]")
        selected = sorted(names)
    else:
        roles = tuple(roles)
        selected = sorted(name for name, meta in known.items() if meta.get("role", "train") in roles)
    if not selected:
        raise DataError(f"no tasks selected: the prepared data has no task with role {list(roles)}"
                        if names is None else "no tasks selected: -k tasks=[...] is empty")
    return selected


def task_table(tasks: Iterable[str]) -> dict[str, int]:
    """Task name → routing row 0..n-1, in the given order."""
    return {name: row for row, name in enumerate(tasks)}


def mixing_counts(sizes: dict[str, int], mixing: str | None, *, cap: int, temperature: float = 2.0) -> dict[str, int]:
    """Rows each task contributes to one epoch.

    - `None`: every row once.
    - `proportional` (examples-proportional, T5): min(n_t, cap).
    - `uniform`: the same count for every non-empty task, the mean of min(n_t, cap) (same epoch size as
      proportional; small tasks are upsampled, large ones subsampled).
    - `temperature`: rate ∝ min(n_t, cap)^(1/T), scaled to the proportional epoch size.
    """
    if mixing is None:
        return dict(sizes)
    if mixing not in MIXING:
        raise ConfigError(f"task_mixing={mixing!r} is not one of {list(MIXING)}; fix -k task_mixing=…")
    if cap < 1:
        raise ConfigError(f"mixing_cap={cap} must be at least 1")
    capped = {name: min(n, cap) for name, n in sizes.items()}
    total = sum(capped.values())
    if mixing == "proportional" or total == 0:
        return capped
    if mixing == "uniform":
        share = round(total / sum(1 for n in capped.values() if n))
        return {name: share if n else 0 for name, n in capped.items()}
    if temperature <= 0:
        raise ConfigError(f"mixing_temperature={temperature} must be > 0")
    rates = {name: n ** (1.0 / temperature) for name, n in capped.items()}
    norm = sum(rates.values())
    return {name: round(total * rate / norm) for name, rate in rates.items()}


def row_keys(task_names: list[str], instance_ids: list[str], sources: list[str], seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 per row, from its content: the same row gets the same key anywhere."""
    salt = str(seed).encode()[:64]
    return np.array([
        int.from_bytes(hashlib.blake2b(f"{t}\0{i}\0{s}".encode(), digest_size=8, key=salt).digest(), "little")
        for t, i, s in zip(task_names, instance_ids, sources)], dtype=np.uint64)


def _sampling_plan(data_dir, split: str, sizes: dict[str, int], counts: dict[str, int],
                   seed: int) -> dict[str, tuple[int, int]]:
    """Per task (q, threshold): every row is repeated q times, plus once more when its key < threshold.

    A task of n rows that must contribute m = q·n + r rows gets its r extra rows as the r smallest
    keys, so the sample is exact, seeded, and decided per row inside the tokenize tasks.
    """
    plan = {name: (counts[name] // n, 0) for name, n in sizes.items() if n}
    partial = sorted(name for name, n in sizes.items() if n and counts[name] % n)
    if partial:
        table = read_rows(data_dir, tasks=partial, splits=[split], columns=["task_name", "instance_id", "source"])
        keys = row_keys(*(table[c].to_pylist() for c in ("task_name", "instance_id", "source")), seed)
        names = np.asarray(table["task_name"].to_pylist(), dtype=object)
        for name in partial:
            task_keys = np.sort(keys[names == name])
            if len(task_keys) != sizes[name]:
                raise DataError(f"{data_dir}: task '{name}' has {len(task_keys)} '{split}' rows but the manifest "
                                f"says {sizes[name]}; run `mttl prepare check {data_dir}` and prepare it again")
            plan[name] = (counts[name] // sizes[name], int(task_keys[counts[name] % sizes[name]]))
    return plan


@functools.lru_cache(maxsize=4)
def cached_tokenizer(spec: str | None, model: str | None = None):
    """`load_tokenizer`, loaded once per process (each Ray worker reuses it for every batch)."""
    from mttl.models.tokenizer import load_tokenizer

    return load_tokenizer(spec, model=model)


def tokenize_rows(tokenizer, sources: list[str], targets: list[str], *, max_input_length: int,
                  max_output_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Input and label ids, truncated to the limits and ending in EOS (the tokenizer adds it)."""
    inputs = tokenizer(sources, max_length=max_input_length, truncation=True).input_ids
    labels = tokenizer(targets, max_length=max_output_length, truncation=True).input_ids
    return inputs, labels


def _mix_and_tokenize(batch: pa.Table, *, tokenizer_spec, model, max_input_length, max_output_length,
                      task_to_row, plan, seed) -> pa.Table:
    names = batch["task_name"].to_pylist()
    sources = batch["source"].to_pylist()
    copies = np.array([plan[name][0] for name in names], dtype=np.int64)
    thresholds = [plan[name][1] for name in names]
    if any(thresholds):
        keys = row_keys(names, batch["instance_id"].to_pylist(), sources, seed)
        # compared as Python ints: uint64 keys do not fit a float or int64 exactly
        copies += np.array([int(key) < limit for key, limit in zip(keys, thresholds)], dtype=np.int64)
    keep = np.repeat(np.arange(len(names)), copies)
    if len(keep) == 0:
        return OUTPUT_SCHEMA.empty_table()
    kept_rows = sorted(set(keep.tolist()))
    position = {row: i for i, row in enumerate(kept_rows)}
    targets = batch["target"].to_pylist()
    inputs, labels = tokenize_rows(cached_tokenizer(tokenizer_spec, model), [sources[r] for r in kept_rows],
                                   [targets[r] for r in kept_rows], max_input_length=max_input_length,
                                   max_output_length=max_output_length)
    return pa.Table.from_arrays([
        pa.array([inputs[position[r]] for r in keep], pa.list_(pa.int32())),
        pa.array([labels[position[r]] for r in keep], pa.list_(pa.int32())),
        pa.array([task_to_row[names[r]] for r in keep], pa.int64()),
    ], schema=OUTPUT_SCHEMA)


@contextlib.contextmanager
def _ordered_execution():
    """Run Ray Data with preserve_order on: block order (and so the global shuffle) is reproducible."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = before


# Ray Data reads Parquet footers in batches of 10 files on a pool of actors, 32 by default: on a small
# cluster every read started 32 fresh processes for a handful of files (7.5 s of a 12 s build on 2
# cores, and ~200 MB each). One actor per batch of files, never more than Ray's default.
_FILES_PER_FOOTER_BATCH, _MAX_FOOTER_READERS = 10, 32


@contextlib.contextmanager
def _footer_readers_for(n_files: int):
    """Size Ray Data's Parquet footer-reader pool to the files read (an explicit env setting wins)."""
    name = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
    if name in os.environ:
        yield
        return
    os.environ[name] = str(max(1, min(_MAX_FOOTER_READERS, math.ceil(n_files / _FILES_PER_FOOTER_BATCH))))
    try:
        yield
    finally:
        os.environ.pop(name, None)


def build_dataset(data_dir: str | os.PathLike, *, split: str, tasks: list[str], task_to_row: dict[str, int],
                  tokenizer_spec: str | None, max_input_length: int, max_output_length: int,
                  mixing: str | None = "proportional", mixing_cap: int = 500_000, mixing_temperature: float = 2.0,
                  seed: int = 0, model: str | None = None, source_uri: str | None = None):
    """A materialized Ray Dataset of `input_ids`, `labels` (list<int32>) and `task_ids` (int64).

    Rows of `split` of `tasks`, mixed per `mixing` (None: every row once), tokenized once with
    `load_tokenizer(tokenizer_spec, model=model)`, globally shuffled by `seed`. With `source_uri` (the
    bucket `data_dir` is a local copy of), Ray Data's read tasks read the shards from the bucket itself,
    on whichever node they run; the manifest and the sampling plan come from the local copy.
    """
    import ray.data
    from ray.data.expressions import col

    root = Path(data_dir)
    manifest = read_manifest(root)
    if not tasks:
        raise DataError(f"no tasks given to stream from {root}; select some with -k tasks=[...]")
    missing = sorted(set(tasks) - set(manifest["tasks"]))
    if missing:
        raise DataError(f"task(s) {missing} are not in {root / 'manifest.json'}; fix -k tasks=[...]")
    unrouted = sorted(set(tasks) - set(task_to_row))
    if unrouted:
        raise DataError(f"task(s) {unrouted} have no routing row in the task table; add them to tasks.json")
    sizes = {name: int(manifest["tasks"][name].get("rows", {}).get(split, 0)) for name in tasks}
    if not sum(sizes.values()):
        raise DataError(f"{root}: the selected tasks have no rows in split '{split}' "
                        f"(e.g. {tasks[0]}: {manifest['tasks'][tasks[0]].get('rows')}); choose another split or tasks")
    counts = mixing_counts(sizes, mixing, cap=mixing_cap, temperature=mixing_temperature)
    cached_tokenizer(tokenizer_spec, model)  # a bad tokenizer fails here as one line, not inside a Ray task
    plan = _sampling_plan(root, split, sizes, counts, seed)
    filesystem = None
    if source_uri:
        from mttl import storage

        filesystem, base = storage.filesystem(source_uri)
        paths = [f"{base.rstrip('/')}/{entry['path']}" for entry in manifest["files"]]
    else:
        paths = [str(root / entry["path"]) for entry in manifest["files"]]
    with _footer_readers_for(len(paths)):
        # the footer pool is sized when the read is planned
        source = ray.data.read_parquet(paths, filesystem=filesystem)
    with _ordered_execution():
        dataset = (source
                   .select_columns(_READ_COLUMNS)
                   .filter(expr=(col("split") == split) & col("task_name").is_in(sorted(plan)))
                   .map_batches(_mix_and_tokenize, batch_format="pyarrow", batch_size=1024,
                                fn_kwargs=dict(tokenizer_spec=tokenizer_spec, model=model,
                                               max_input_length=max_input_length,
                                               max_output_length=max_output_length,
                                               task_to_row={name: task_to_row[name] for name in tasks},
                                               plan=plan, seed=seed))
                   .random_shuffle(seed=seed)
                   .materialize())
    return dataset


# split -> (key, dataset): one dataset per split, so at most two are held between runs
_LAST_BUILT: dict[str, tuple[str, object]] = {}


def reuse_or_build_dataset(data_dir: str | os.PathLike, *, split: str, **build_args):
    """`build_dataset`, or the dataset this driver last built for `split` if nothing it depends on changed.

    The same arguments, the same prepared folder (its manifest unchanged on disk), the same Ray job
    and the same live nodes: a lost node means its blocks may be gone, so the data is built again.
    Holding it keeps its blocks in the object store until another build for the split replaces it.
    """
    import ray

    manifest = Path(data_dir) / "manifest.json"
    try:
        stat = manifest.stat()
        stamp = [stat.st_mtime_ns, stat.st_size]
    except OSError:
        stamp = None  # build_dataset names the missing manifest
    key = json.dumps([str(Path(data_dir).resolve()), stamp, split, build_args, ray.get_runtime_context().get_job_id(),
                      sorted(alive_node_ids())], sort_keys=True, default=str)
    last = _LAST_BUILT.get(split)
    if last is not None and last[0] == key:
        return last[1]
    _LAST_BUILT.pop(split, None)  # the old blocks may go before the new ones are built
    dataset = build_dataset(data_dir, split=split, **build_args)
    _LAST_BUILT[split] = (key, dataset)
    return dataset


def alive_node_ids() -> set[str]:
    import ray

    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


class DatasetPerAttempt:
    """The dataset for Ray Train's `datasets=`, called once per worker-group start (first and each restart).

    It returns `dataset` (built by the driver) while every node that was up when it was built is
    still up, and otherwise what `rebuild()` returns. A block's only copy may have gone with a
    lost node, and the object directory cannot say so for blocks under 100 KiB (those read as
    in-memory objects with no node either way), so any lost node triggers one rebuild.
    """

    def __init__(self, dataset, rebuild):
        self.dataset, self.rebuild = dataset, rebuild
        self.built_with = alive_node_ids()
        self.rebuilds = 0

    def __call__(self):
        alive = alive_node_ids()
        lost = self.built_with - alive
        if lost:
            print(f"[mttl] {len(lost)} node(s) left the cluster since the data was built; building it again",
                  flush=True)
            self.built_with = alive
            self.dataset = self.rebuild()
            self.rebuilds += 1
        return self.dataset


def data_config(datasets_to_split: Iterable[str] = ("train",)):
    """`ray.train.DataConfig` splitting `datasets_to_split` evenly, in a fixed order, across workers.

    Other datasets (e.g. "validation") reach every worker whole.
    """
    from ray.data import DataContext
    from ray.train import DataConfig

    # the driver's options (resource limits included), with a fixed block order
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    # Locality would make the row → worker assignment depend on where blocks happen to live.
    return DataConfig(datasets_to_split=list(datasets_to_split), execution_options=options,
                      enable_shard_locality=False)


def batches_per_epoch(num_rows: int, *, num_workers: int, batch_size: int) -> int:
    """Micro-batches each worker sees per epoch (the even split drops at most num_workers-1 rows)."""
    return math.ceil((num_rows // max(num_workers, 1)) / batch_size)


def collate(batch: dict[str, np.ndarray], pad_id: int) -> dict:
    """Right-pad a numpy batch into `input_ids`, `attention_mask`, `labels` (pad -100), `task_ids` tensors."""
    import torch

    def pad(sequences, value: int) -> torch.Tensor:
        sequences = [np.asarray(s) for s in sequences]
        out = torch.full((len(sequences), max((len(s) for s in sequences), default=0)), value, dtype=torch.long)
        for i, seq in enumerate(sequences):
            out[i, :len(seq)] = torch.from_numpy(seq.astype(np.int64))
        return out

    input_ids = pad(batch["input_ids"], pad_id)
    lengths = torch.tensor([len(s) for s in batch["input_ids"]])
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": pad(batch["labels"], LABEL_PAD),
            "task_ids": torch.tensor(np.asarray(batch["task_ids"], dtype=np.int64))}


def bounded_waits(iterator: Iterable, timeout_s: float, waiting_for: str) -> Iterator:
    """`iterator`'s items, each waited for at most `timeout_s` seconds; DataError naming what was awaited.

    A Ray Data iterator blocks without limit when a block it needs is gone or a read stalls; this
    pulls items on a helper thread, one at a time (no read-ahead beyond Ray Data's own), so the
    order and memory are unchanged and a stall becomes an error the run can report.
    """
    import queue
    import threading

    handoff: queue.Queue = queue.Queue(maxsize=1)
    done, stop = object(), threading.Event()

    def pull() -> None:
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        handoff.put((item, None), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            handoff.put((done, None))
        except BaseException as err:  # handed to the consumer, raised there
            handoff.put((done, err))

    threading.Thread(target=pull, name="mttl-data", daemon=True).start()
    try:
        while True:
            try:
                item, error = handoff.get(timeout=timeout_s)
            except queue.Empty:
                raise DataError(f"waited {timeout_s:g} s for {waiting_for}; check that every node is alive and "
                                "the object store is not full (`ray status`), or raise data_timeout_s") from None
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()


def iter_epoch(shard, *, batch_size: int, epoch: int, seed: int, pad_id: int, skip_batches: int = 0,
               shuffle_buffer_rows: int | None = None) -> Iterator[dict]:
    """Collated micro-batches of one epoch of a worker's shard, shuffled by (seed, epoch).

    The first `skip_batches` batches are drawn and dropped, so a resumed run sees exactly the
    batches it had not trained on yet.
    """
    buffer = shuffle_buffer_rows or max(1024, 16 * batch_size)
    batches = shard.iter_batches(batch_size=batch_size, batch_format="numpy", local_shuffle_buffer_size=buffer,
                                 local_shuffle_seed=seed + epoch)
    for index, batch in enumerate(batches):
        if index >= skip_batches:
            yield collate(batch, pad_id)
