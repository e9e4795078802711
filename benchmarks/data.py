"""Data benchmarks: prepare throughput, and Ray Data streaming into 2 Ray Train workers vs pyarrow.

Measures, in one run on one machine:
- prepare throughput (instances/s) of Super-NaturalInstructions (`available` split of the shared
  checkout; `--quick`: a 24-task subset) and of the synthetic suite;
- streaming the NI `train` shards: `stream.build_dataset` (read, mix, tokenize once, shuffle,
  materialize) then epochs of `stream.iter_epoch` batches into 2 TorchTrainer workers
  (0.5 CPU each), against one process reading the same shards with pyarrow, tokenizing them with
  the same tokenizer and collating the same batches. Ratios: per epoch (the stream serves
  pre-tokenized rows, the baseline tokenizes every epoch) and end to end for the first epoch
  (build + epoch 0).

Writes `benchmarks/out/data.json` and `benchmarks/out/data.md` (atomically) and prints the table.
Usage: `python benchmarks/data.py [--quick] [--out DIR] [--shared DIR]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mttl.config import Config  # noqa: E402
from mttl.run_folder import atomic_write_text  # noqa: E402
from mttl.data import stream  # noqa: E402
from mttl.data.ni import prepare_ni  # noqa: E402
from mttl.data.shards import read_manifest, read_rows  # noqa: E402

BATCH_SIZE = 32
MAX_INPUT, MAX_OUTPUT = 512, 64


def subset_source(ni_source: Path, work: Path, n_train: int, n_test: int) -> tuple[Path, str]:
    """A source folder whose `bench` split lists the first tasks of `available` (task files linked, not copied)."""
    root = work / "ni_subset"
    (root / "splits" / "bench").mkdir(parents=True)
    (root / "tasks").symlink_to(ni_source / "tasks")
    for role, n in (("train", n_train), ("test", n_test)):
        names = (ni_source / "splits" / "available" / f"{role}_tasks.txt").read_text().split()[:n]
        (root / "splits" / "bench" / f"{role}_tasks.txt").write_text("\n".join(names) + "\n")
    return root, "bench"


def bench_prepare(name: str, prepare) -> dict:
    start = time.perf_counter()
    manifest = prepare()
    seconds = time.perf_counter() - start
    rows = sum(entry["rows"] for entry in manifest["files"])
    return {"source": name, "tasks": len(manifest["tasks"]), "instances": rows, "seconds": round(seconds, 2),
            "instances_per_s": round(rows / seconds, 1)}


def bench_pyarrow(data_dir: Path, tasks: list[str], tokenizer_spec: str) -> dict:
    """One process: read the split with pyarrow, tokenize, collate the same micro-batches.

    The tokenizer is loaded before the clock starts: a training process loads it once, not per epoch.
    """
    table_of_rows = stream.task_table(tasks)
    tokenizer = stream.cached_tokenizer(tokenizer_spec)
    start = time.perf_counter()
    table = read_rows(data_dir, tasks=tasks, splits=["train"], columns=["task_name", "source", "target"])
    rows = 0
    for offset in range(0, table.num_rows, BATCH_SIZE):
        chunk = table.slice(offset, BATCH_SIZE)
        inputs, labels = stream.tokenize_rows(tokenizer, chunk["source"].to_pylist(), chunk["target"].to_pylist(),
                                              max_input_length=MAX_INPUT, max_output_length=MAX_OUTPUT)
        batch = stream.collate({"input_ids": inputs, "labels": labels,
                                "task_ids": [table_of_rows[t] for t in chunk["task_name"].to_pylist()]},
                               pad_id=tokenizer.pad_token_id)
        rows += len(batch["task_ids"])
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1)}


def _stream_loop(config):
    """Worker: time each epoch of `iter_epoch` batches and write (rows, seconds) per epoch."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    epochs = []
    for epoch in range(config["epochs"]):
        start, rows = time.perf_counter(), 0
        for batch in stream.iter_epoch(shard, batch_size=BATCH_SIZE, epoch=epoch, seed=0, pad_id=config["pad_id"]):
            rows += len(batch["task_ids"])
        epochs.append({"rows": rows, "seconds": time.perf_counter() - start})
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(epochs))


def bench_stream(data_dir: Path, tasks: list[str], tokenizer_spec: str, work: Path, epochs: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start = time.perf_counter()
    dataset = stream.build_dataset(data_dir, split="train", tasks=tasks, task_to_row=stream.task_table(tasks),
                                   tokenizer_spec=tokenizer_spec, max_input_length=MAX_INPUT,
                                   max_output_length=MAX_OUTPUT, mixing=None, seed=0)
    build_s = time.perf_counter() - start
    out = work / "stream_ranks"
    out.mkdir()
    pad_id = stream.cached_tokenizer(tokenizer_spec).pad_token_id
    start = time.perf_counter()
    TorchTrainer(_stream_loop, train_loop_config={"out": str(out), "epochs": epochs, "pad_id": pad_id},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 datasets={"train": dataset}, dataset_config=stream.data_config(),
                 run_config=RunConfig(name="bench_stream", storage_path=str(work / "ray"))).fit()
    fit_s = time.perf_counter() - start
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    per_epoch = []
    for epoch in range(epochs):
        rows = sum(r[epoch]["rows"] for r in ranks)
        seconds = max(r[epoch]["seconds"] for r in ranks)  # the epoch ends when the slower worker is done
        per_epoch.append({"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1)})
    later = per_epoch[1:] or per_epoch
    return {"rows": dataset.count(), "build_seconds": round(build_s, 2), "fit_seconds": round(fit_s, 2),
            "epochs": per_epoch,
            "epoch_rows_per_s": round(sum(e["rows"] for e in later) / sum(e["seconds"] for e in later), 1),
            "first_epoch_end_to_end_rows_per_s": round(per_epoch[0]["rows"] / (build_s + per_epoch[0]["seconds"]), 1)}


def markdown(results: dict) -> str:
    lines = ["| measurement | value |", "|---|---|"]
    for prep in results["prepare"]:
        lines.append(f"| prepare {prep['source']} ({prep['tasks']} tasks, {prep['instances']} instances) | "
                     f"{prep['instances_per_s']:,.0f} instances/s ({prep['seconds']} s) |")
    base, ray_stream = results["pyarrow"], results["stream"]
    lines += [
        f"| pyarrow, 1 process: read + tokenize + collate, per epoch ({base['rows']} rows) "
        f"| {base['rows_per_s']:,.0f} rows/s |",
        f"| Ray Data build: read + tokenize once + shuffle + materialize | {ray_stream['build_seconds']} s |",
        f"| Ray Data → 2 Train workers, epochs after the first (pre-tokenized) "
        f"| {ray_stream['epoch_rows_per_s']:,.0f} rows/s |",
        f"| Ray Data → 2 Train workers, first epoch incl. build "
        f"| {ray_stream['first_epoch_end_to_end_rows_per_s']:,.0f} rows/s |",
        f"| ratio per epoch (Ray / pyarrow) | {results['ratio_per_epoch']:.2f} |",
        f"| ratio first epoch incl. build (Ray / pyarrow) | {results['ratio_first_epoch']:.2f} |",
        f"| TorchTrainer.fit wall time ({len(ray_stream['epochs'])} epochs) | {ray_stream['fit_seconds']} s |",
    ]
    env = results["environment"]
    lines.append(f"\n{env['cpus']} CPUs, load average {env['load_average_before']} before the run; "
                 f"tokenizer `{results['tokenizer']}`, batch {BATCH_SIZE}, max lengths {MAX_INPUT}/{MAX_OUTPUT}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 24-task NI subset, a small synthetic suite, 2 epochs")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"), help="folder for data.json and data.md")
    parser.add_argument("--shared", default=os.environ.get("MTTL_SHARED_DIR", str(REPO.parent / "shared")),
                        help="the shared folder with data/natural-instructions and tokenizers/t5")
    args = parser.parse_args(argv)
    shared = Path(args.shared)
    ni_source = shared / "data" / "natural-instructions"
    t5 = shared / "tokenizers" / "t5"
    tokenizer_spec = str(t5) if t5.is_dir() else "byte"
    load_before = os.getloadavg()[0]

    from mttl.data.synthetic import prepare_synthetic
    from mttl.ray_utils import init_ray

    with tempfile.TemporaryDirectory(prefix="mttl-bench-data-") as tmp:
        work = Path(tmp)
        if args.quick:
            source, split = subset_source(ni_source, work, n_train=20, n_test=4)
        else:
            source, split = ni_source, "available"
        prepared = work / "ni"
        results = {"quick": args.quick, "tokenizer": tokenizer_spec, "prepare": []}
        results["prepare"].append(bench_prepare(f"ni/{split}", lambda: prepare_ni(source, prepared, split=split)))
        synthetic_rows = {"rows_per_task": 100, "warmup_rows_per_task": 200} if args.quick else {}
        results["prepare"].append(bench_prepare(
            "synthetic", lambda: prepare_synthetic(work / "synthetic", seed=0, **synthetic_rows)))

        tasks = stream.select_tasks(read_manifest(prepared))
        results["pyarrow"] = bench_pyarrow(prepared, tasks, tokenizer_spec)
        init_ray(Config())
        results["stream"] = bench_stream(prepared, tasks, tokenizer_spec, work, epochs=2 if args.quick else 3)
    results["ratio_per_epoch"] = round(results["stream"]["epoch_rows_per_s"] / results["pyarrow"]["rows_per_s"], 3)
    results["ratio_first_epoch"] = round(
        results["stream"]["first_epoch_end_to_end_rows_per_s"] / results["pyarrow"]["rows_per_s"], 3)
    import ray

    results["environment"] = {"cpus": os.cpu_count(), "ray_cpus": ray.cluster_resources().get("CPU"),
                              "load_average_before": round(load_before, 1), "python": platform.python_version(),
                              "ray": ray.__version__}
    out = Path(args.out)
    atomic_write_text(out / "data.json", json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    atomic_write_text(out / "data.md", "# Data benchmarks\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
