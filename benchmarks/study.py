"""The synthetic skills study: LoRA, Poly and MHR pre-trained on the same warmed-up tiny T5, adapted
to the held-out skill compositions with the default finetune type, `Z` and `MuZ`, over 3 seeds.

1. phase one (once): the tiny T5 trained whole on the warm-up tasks (`mttl pretrain`'s default);
2. phase two per method, on that frozen backbone and the composition tasks: a shared LoRA
   (K = 1), Poly (K = 8, S = 1) and MHR (K = 8, S = 4), same rank, steps and learning rates;
3. few-shot runs (32 shots) on every held-out composition: Poly/MHR with the default type
   (adapters + a fresh routing row), `Z` (routing only) and `MuZ` (average routing, adapters
   trained); LoRA with `A` (its adapters trained further); and a fresh LoRA on the backbone;
4. the table: test exact match, median over seeds per task, mean over tasks; the report (routing
   heatmaps and whether each task's routing picks the skills it is built from).

    python benchmarks/study.py            # ≈ 40 min on 2 CPU cores (2,400 + 3 × 1,200 steps, 144 few-shot runs)
    python benchmarks/study.py --quick    # a smoke run: a few steps, one seed
Writes benchmarks/out/study/ (runs, report/) and benchmarks/out/study.json and .md. Re-running resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from _env import OUT  # first: the repo on sys.path, the Ray/DeepSpeed environment

from mttl.config import Config, load_config  # noqa: E402
from mttl.quickstart import FINETUNE, adapt_all, held_out  # noqa: E402
from mttl.train import recipe as pretrain_recipe  # noqa: E402

ROUTED = {"poly": {"n_splits": 1}, "mhr": {"n_splits": 4}}
LORA = {"model_modifier": "lora", "trainable_param_names": ".*lora_[ab].*"}
# column label → finetune_type, per pre-trained method
TYPES = {"default": None, "Z": "Z", "MuZ": "MuZ"}


def pretrain_all(base: Config, methods: list[str], backbone_steps: int, started: float) -> tuple[Path, dict[str, Path]]:
    """Phase one once, then phase two per method on its saved backbone; resumes finished runs."""
    from mttl.models.run import BACKBONE_DIR, FINAL_DIR
    from mttl.train.loop import pretrain

    say(started, f"phase one: the tiny T5 on the warm-up tasks, {backbone_steps} steps")
    phase_one = pretrain_recipe.backbone_phase_config(base)
    phase_one.update({"total_steps": backbone_steps, "eval_every": max(backbone_steps // 4, 1),
                      "save_every": max(backbone_steps // 2, 1)}, source="study")
    backbone_run = pretrain(phase_one, roles=("warmup",))
    runs = {}
    for method in methods:
        say(started, f"phase two: {method} adapters on the frozen backbone")
        keys = LORA if method == "lora" else ROUTED[method]
        cfg = base.copy(model=str(backbone_run / FINAL_DIR / BACKBONE_DIR), run_name=f"{base.run_name}-{method}")
        cfg.update(keys, source="study")
        runs[method] = pretrain(cfg)
    return backbone_run, runs


def finetune_configs(base: Config, backbone_run: Path, runs: dict[str, Path], finetune_keys: dict) -> dict[str, Config]:
    """label `<method>/<type>` → its few-shot config (one run folder each)."""
    configs = {}

    def add(label: str, checkpoint: Path, finetune_type, extra: dict) -> None:
        keys = {**finetune_keys, **extra, "finetune_type": finetune_type, "checkpoint": str(checkpoint),
                "output_dir": base.output_dir, "run_name": f"{base.run_name}-ft-{label.replace('/', '-')}"}
        configs[label] = load_config(None, keys)

    for method, run in runs.items():
        if method == "lora":
            add("lora/default", run, "A", {})
        else:
            for column, finetune_type in TYPES.items():
                add(f"{method}/{column}", run, finetune_type, {})
    add("fresh-lora/default", backbone_run, "A", {**LORA, "lora_rank": base.lora_rank})
    return configs


def summarise(ft_runs: dict[str, Path]) -> dict:
    from mttl.run_folder import aggregate, read_results

    out = {}
    for label, path in ft_runs.items():
        rows = read_results(path)
        test, zero = aggregate(rows, "test"), aggregate(rows, "zero_shot")
        out[label] = {"mean": test["mean"], "std_over_tasks": test["std"], "per_task": test["per_task"],
                      "zero_shot_mean": zero["mean"], "seeds": sorted({r["seed"] for r in rows}), "run": str(path)}
    return out


def markdown(summary: dict, meta: dict) -> str:
    methods = list(dict.fromkeys(label.split("/")[0] for label in summary))
    lines = [f"Test exact match on the held-out compositions: median over seeds {meta['seeds']} per task, "
             f"mean (std) over {meta['n_tasks']} tasks. Machine: {meta['machine']}. Command: `{meta['command']}`.", "",
             "| pre-trained | " + " | ".join(TYPES) + " | zero-shot |", "|---" * (len(TYPES) + 2) + "|"]
    for method in methods:
        cells = []
        for column in TYPES:
            s = summary.get(f"{method}/{column}")
            cells.append(f"{s['mean']:.3f} ({s['std_over_tasks']:.3f})" if s else "—")
        zero = summary.get(f"{method}/default", {}).get("zero_shot_mean", float("nan"))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {zero:.3f} |")
    tasks = sorted({t for s in summary.values() for t in s["per_task"]})
    lines += ["", "Per task (median over seeds):", "", "| task | " + " | ".join(summary) + " |",
              "|---" * (len(summary) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join(f"{s['per_task'].get(t, float('nan')):.3f}" for s in summary.values()) + " |"
              for t in tasks]
    return "\n".join(lines) + "\n"


def say(started: float, message: str) -> None:
    print(f"[study {time.monotonic() - started:5.0f}s] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a few steps, one seed, two tasks' worth of time")
    parser.add_argument("--out", type=Path, default=OUT / "study", help="run folder root. Example: --out /tmp/study")
    recipe_steps = pretrain_recipe.DEFAULTS["total_steps"]
    parser.add_argument("--backbone-steps", type=int, default=pretrain_recipe.BACKBONE_STEP_FACTOR * recipe_steps,
                        help="phase-one steps (default: the quick start's, mttl.train.recipe)")
    parser.add_argument("--adapter-steps", type=int, default=recipe_steps,
                        help="phase-two steps per method (default: the quick start's)")
    parser.add_argument("--seeds", default="13,42,58", help="fine-tuning seeds. Example: --seeds 13,42")
    parser.add_argument("--methods", default="lora,poly,mhr", help="pre-trained methods. Example: --methods poly,mhr")
    args = parser.parse_args()
    started = time.monotonic()
    steps, backbone_steps = (20, 40) if args.quick else (args.adapter_steps, args.backbone_steps)
    seeds = [13] if args.quick else [int(s) for s in args.seeds.split(",")]
    # the embedded default as the command's defaults (not as user settings): phase one replaces them
    base = load_config(None, {"n_skills": 8, "output_dir": str(args.out), "run_name": "study", "total_steps": steps,
                              "eval_every": max(steps // 4, 1), "save_every": steps, "log_every": 50},
                       base=pretrain_recipe.DEFAULTS)
    backbone_run, runs = pretrain_all(base, args.methods.split(","), backbone_steps, started)
    # the quick start's few-shot settings, 3 seeds and the zero-shot pass (the routing's starting point)
    finetune_keys = {**FINETUNE, "seeds": seeds, "do_zs": True, **({"total_steps": 10} if args.quick else {})}
    tasks = held_out(next(iter(runs.values())))
    say(started, f"fine-tuning {len(tasks)} held-out tasks × {len(seeds)} seeds")
    ft_runs = adapt_all(finetune_configs(base, backbone_run, runs, finetune_keys), tasks, started)
    summary = summarise(ft_runs)

    from mttl.report import build_report

    report = build_report([backbone_run, *runs.values(), *ft_runs.values()], args.out / "report")
    meta = {"command": "python benchmarks/study.py" + (" --quick" if args.quick else ""), "seeds": seeds,
            "n_tasks": len(tasks), "adapter_steps": steps, "backbone_steps": backbone_steps,
            "finetune": finetune_keys, "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU",
            "wall_s": round(time.monotonic() - started), "report": str(report)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "study.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=2, default=str))
    table = markdown(summary, meta)
    (OUT / "study.md").write_text(table)
    print(table)
    say(started, f"report: {report}")


if __name__ == "__main__":
    main()
