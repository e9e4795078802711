"""Arrow routing against average routing, zero-shot on the synthetic suite's held-out tasks.

Trains, in this process (plain torch, no Ray: the library is the point, not the trainer), a tiny
T5 jointly with one private LoRA per training task (`model_modifier=skilled`: warm-up and
composition tasks), then scores every held-out composition without training under
- `average`: the uniform mix of all task LoRAs (1/K, the MHR-µ zero-shot baseline);
- `arrow` (`router_selector=arrow`) for a few top-k / temperature settings;
- `private`, the training tasks through their own LoRA (what the library learned at all).

    python benchmarks/arrow.py            # ~4 minutes on one free core (13 on a loaded 2-core machine)
    python benchmarks/arrow.py --steps 3000

Writes `benchmarks/out/arrow.json` and `benchmarks/out/arrow.md` and prints the table.
"""

from __future__ import annotations

import _env  # noqa: F401  (repository importable, environment set)

import argparse
import json
import random
import time
from statistics import fmean

import torch

from mttl.adapters import AdapterConfig, adapted_layers, modify_model, ops
from mttl.adapters.routing import AverageSelector
from mttl.config import Config
from mttl.data.fewshot import eval_rows
from mttl.data.shards import read_manifest, read_rows
from mttl.data.synthetic import prepare_synthetic
from mttl.evaluation.predict import encode_sources, encode_targets, evaluate_rows
from mttl.models.backbone import load_backbone
from mttl.models.routed import RoutedModel
from mttl.models.tokenizer import load_tokenizer

ARROW_SETTINGS = [(1, 1.0), (2, 1.0), (4, 1.0), (4, 0.1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    data = _env.OUT / "arrow_data"
    prepare_synthetic(data, seed=args.seed, n_heldout=4, rows_per_task=300, warmup_rows_per_task=600,
                      validation_rows=20, heldout_pool=20, heldout_validation=20, heldout_test=50)
    tasks = read_manifest(data)["tasks"]
    library = sorted(t for t, m in tasks.items() if m["role"] != "test")
    held_out = sorted(t for t, m in tasks.items() if m["role"] == "test")
    table = read_rows(data, tasks=library, splits=["train"]).to_pylist()
    by_task = {t: [r for r in table if r["task_name"] == t] for t in library}

    tokenizer = load_tokenizer("byte")
    torch.manual_seed(args.seed)
    acfg = AdapterConfig(modifier="skilled", rank=4, alpha=4.0, n_tasks=len(library), randb_init=False)
    model = modify_model(load_backbone("tiny-t5", vocab_size=len(tokenizer), tiny_d_model=64, seed=args.seed), acfg)
    routed = RoutedModel(model).train()
    optimizer = torch.optim.AdamW([p for p in routed.parameters() if p.requires_grad], lr=3e-3)
    rng = random.Random(args.seed)
    for step in range(args.steps):
        ids = [rng.randrange(len(library)) for _ in range(args.batch)]
        rows = [rng.choice(by_task[library[i]]) for i in ids]
        loss = routed(task_ids=torch.tensor(ids), labels=encode_targets(tokenizer, [r["target"] for r in rows], 32),
                      **encode_sources(tokenizer, rows, 64)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - started:.0f}s)", flush=True)
    routed.eval()
    cfg = Config().update({"num_beams": 1, "predict_batch_size": 64, "max_output_length": 32,
                           "max_input_length": 64})

    def score(task: str, task_id: int, split: str) -> float:
        return evaluate_rows(routed, tokenizer, eval_rows(data, task, split), task_id, "exact_match", cfg)["value"]

    def held_out_scores(task: str) -> dict:
        """Exact match (%) and the mean target-token NLL (finer than exact match when it is all 0)."""
        rows = eval_rows(data, task, "test")
        nll = routed(task_ids=torch.zeros(len(rows), dtype=torch.long), **encode_sources(tokenizer, rows, 64),
                     labels=encode_targets(tokenizer, [r["target"] for r in rows], 32)).loss.item()
        return {"exact_match": score(task, 0, "test"), "nll": nll}

    results = {"steps": args.steps, "library": library, "held_out": held_out, "routing": {}}
    with torch.no_grad():
        results["routing"]["private (training tasks)"] = fmean(
            score(t, i, "validation") for i, t in enumerate(library))
        original = {name: layer.selector for name, layer in adapted_layers(model).items()}
        average = AverageSelector(1, len(library))
        for layer in adapted_layers(model).values():
            layer.selector = average
        results["routing"]["average"] = {t: held_out_scores(t) for t in held_out}
        for top_k, temperature in ARROW_SETTINGS:
            for name, layer in adapted_layers(model).items():
                layer.selector = original[name]
            ops.use_router(model, "arrow", arrow_top_k=top_k, arrow_temperature=temperature)
            results["routing"][f"arrow k={top_k} T={temperature}"] = {t: held_out_scores(t) for t in held_out}
    results["seconds"] = round(time.time() - started, 1)

    lines = [f"Zero-shot exact match on {len(held_out)} held-out compositions; library: {len(library)} per-task "
             f"LoRAs (r=4) trained jointly with a tiny T5 (d_model 64) for {args.steps} steps of {args.batch}.",
             "Cells: exact match % / mean target-token NLL (lower is better).",
             "", "| routing | " + " | ".join(held_out) + " | mean |", "|---" * (len(held_out) + 2) + "|"]
    for name, value in results["routing"].items():
        if isinstance(value, dict):
            means = {m: fmean(v[m] for v in value.values()) for m in ("exact_match", "nll")}
            lines.append(f"| {name} | " + " | ".join(f"{value[t]['exact_match']:.1f} / {value[t]['nll']:.3f}"
                                                      for t in held_out)
                         + f" | {means['exact_match']:.1f} / {means['nll']:.3f} |")
        else:
            lines.append(f"| {name} | " + " | ".join("" for _ in held_out) + f" | {value:.1f} / – |")
    text = "\n".join(lines) + "\n"
    _env.OUT.mkdir(parents=True, exist_ok=True)
    (_env.OUT / "arrow.json").write_text(json.dumps(results, indent=1))
    (_env.OUT / "arrow.md").write_text(text)
    print(text)
    print(f"{results['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
