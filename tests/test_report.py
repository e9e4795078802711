"""`mttl report` on small run folders written in the real formats; numbers checked by hand-written loops."""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image

from mttl.cli import main

S, K = 2, 4
TASKS = ["copy+reverse", "copy+upper", "sort+upper", "sort+reverse_x"]
PRIMITIVES = {"copy+reverse": ["copy", "reverse"], "copy+upper": ["copy", "upper"],
              "sort+upper": ["sort", "upper"], "sort+reverse_x": ["sort", "reverse"]}


def expected_group(selector_name: str) -> str:
    """The layer group a T5 selector belongs to, spelled out from T5's module names."""
    coder = selector_name.split(".")[0]
    for part, sublayer in (("EncDecAttention", "cross-attention"), ("SelfAttention", "self-attention"),
                           ("DenseReluDense", "FFN")):
        if f".{part}." in selector_name:
            return f"{coder} {sublayer}"
    raise AssertionError(selector_name)


def save_poly_adapters(folder: Path, n_splits: int, logits_for, modify_layers: str = "q|v|wi|wo") -> dict:
    """A tiny T5 modified with real Poly/MHR adapters, routing logits set by `logits_for(selector_name)`,
    saved by the real save_adapters. Returns {selector name: logits rows}."""
    from mttl.adapters import AdapterConfig, modify_model, save_adapters, selectors
    from mttl.models.backbone import tiny_t5_config
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(tiny_t5_config(64, d_model=32, num_layers=1))
    modify_model(model, AdapterConfig(modifier="poly", rank=2, n_skills=K, n_splits=n_splits, n_tasks=len(TASKS),
                                      modify_layers=modify_layers))
    rows = {}
    with torch.no_grad():
        for name, selector in selectors(model).items():
            rows[name] = logits_for(name)
            selector.module_logits.copy_(torch.tensor(rows[name]))
    save_adapters(model, folder)
    return rows


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def eval_weights(row: list[float]) -> list[list[float]]:
    """REFERENCE.md 2.6 at eval time, written out: p = sigmoid(z) per head, w = p / (sum_k p + 1e-12)."""
    out = []
    for head in range(S):
        probs = [1 / (1 + math.exp(-row[head * K + k])) for k in range(K)]
        total = sum(probs) + 1e-12
        out.append([p / total for p in probs])
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A pre-training run (with a synthetic manifest), a fine-tuning run and a sweep run."""
    tmp_path = tmp_path_factory.mktemp("suite")
    data = tmp_path / "data"
    data.mkdir()
    manifest_tasks = {t: {"task_id": i, "role": "train", "skills": PRIMITIVES[t], "metric": "exact_match"}
                      for i, t in enumerate(TASKS)}
    manifest_tasks["reverse+upper"] = {"task_id": 4, "role": "test", "skills": ["reverse", "upper"]}
    (data / "manifest.json").write_text(json.dumps({"schema_version": 1, "source": "synthetic",
                                                    "tasks": manifest_tasks}))

    pre = tmp_path / "runs" / "mhr_pre"
    (pre / "final").mkdir(parents=True)
    (pre / "config.json").write_text(json.dumps({"n_splits": S, "n_skills": K, "data_dir": str(data),
                                                 "dataset": "synthetic"}))
    (pre / "tasks.json").write_text(json.dumps({t: i for i, t in enumerate(TASKS)}))
    # Skill k of primitive: copy->0, reverse->1, upper->2, sort->3; a task's logits favour its primitives' skills.
    favour = {"copy": 0, "reverse": 1, "upper": 2, "sort": 3}
    rng = random.Random(0)

    def logits_for(_name):
        rows = []
        for task in TASKS:
            # multiples of 1/64: exact in float32, so the test's float64 loops see the same logits
            row = [round(rng.uniform(-0.5, 0.5) * 64) / 64 for _ in range(S * K)]
            for prim in PRIMITIVES[task]:
                for head in range(S):
                    row[head * K + favour[prim]] += 3.0
            rows.append(row)
        return rows

    logits = save_poly_adapters(pre / "final", S, logits_for)
    metrics = []
    for step in range(10, 110, 10):
        metrics.append({"step": step, "loss": 5.0 - step / 50, "lr_adapters": 1e-3, "tokens_per_s": 1000.0 + step,
                        "step_time_s": 0.1, "data_wait_s": 0.01})
        if step % 50 == 0:
            metrics.append({"step": step, "val_loss": 4.0 - step / 100,
                            **{f"val_loss/{t}": 4.0 - step / 100 + i / 10 for i, t in enumerate(TASKS)}})
    # a resume after a preemption logs step 100 again: the later row counts
    metrics.append({"step": 100, "loss": 2.5, "tokens_per_s": 900.0, "step_time_s": 0.2, "data_wait_s": 0.0})
    (pre / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")

    ft = tmp_path / "runs" / "mhr_ft"
    ft.mkdir()
    results = []
    for finetune_type in ("Z", "MuZ"):
        for task in ("reverse+upper", "copy+sort", "upper+sort"):
            for seed in (13, 42, 58):
                for evaluation in ("zero_shot", "best_val", "test"):
                    results.append({"task": task, "seed": seed, "finetune_type": finetune_type,
                                    "evaluation": evaluation, "metric": "exact_match",
                                    "value": round(rng.uniform(0, 100), 3), "step": 0, "epoch": 0})
    (ft / "results.jsonl").write_text("\n".join(json.dumps(r) for r in results) + "\n")
    # mttl finetune's metrics rows: per seed, training loss and validation scores
    ft_metrics = [{"seed": seed, "step": step, "epoch": step // 5, "train/loss": 3.0 - step / 100 - seed / 1000}
                  for seed in (13, 42) for step in range(10, 60, 10)]
    ft_metrics += [{"seed": seed, "step": step, "val/exact_match": step / 2} for seed in (13, 42) for step in (20, 40)]
    (ft / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in ft_metrics) + "\n")

    sweep = tmp_path / "runs" / "sweep_z"
    sweep.mkdir()
    # the columns mttl.sweep writes: study, trial_id, status, hp/<name>, validations, mean, test_mean
    trials = [{"study": study, "trial_id": f"{study}_t{i}", "status": status, "hp/module_logits_learning_rate": lr,
               "validations": 3, "mean": val, "test_mean": test}
              for study in ("reverse+upper", "copy+sort")
              for i, (status, lr, val, test) in enumerate([("complete", 0.1, 55.0, 50.0),
                                                           ("complete", 0.5, 77.5, 70.0),
                                                           ("stopped", 1.0, 90.0, 10.0),
                                                           ("complete", 1.0, 60.0, 61.0)])]
    with (sweep / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(trials[0]))
        writer.writeheader()
        writer.writerows(trials)
    return {"pre": pre, "ft": ft, "sweep": sweep, "results": results, "logits": logits, "metrics": metrics,
            "trials": trials, "runs": tmp_path / "runs", "tmp": tmp_path}


@pytest.fixture
def suite(built, tmp_path):
    """A private copy of the runs, for tests that change them."""
    shutil.copytree(built["runs"], tmp_path / "runs")
    copies = {kind: tmp_path / "runs" / built[kind].name for kind in ("pre", "ft", "sweep")}
    return {**built, **copies, "runs": tmp_path / "runs", "tmp": tmp_path}


@pytest.fixture(scope="module")
def report(built):
    out = built["tmp"] / "report"
    assert main(["report", str(built["pre"]), str(built["ft"]), str(built["sweep"]), "--out", str(out)]) == 0
    return out


def test_finetune_tables_are_median_over_seeds_then_mean_over_tasks(built, report):
    per_task = read_csv(report / "results_per_task.csv")
    per_method = read_csv(report / "results_per_method.csv")
    groups = {}
    for row in built["results"]:
        groups.setdefault((row["finetune_type"], row["evaluation"], row["task"]), []).append(row["value"])
    assert len(per_task) == len(groups) == 18
    for row in per_task:
        values = groups[(row["finetune_type"], row["evaluation"], row["task"])]
        assert row["method"] == f"mhr_ft ({row['finetune_type']})"
        assert int(row["n_seeds"]) == 3
        assert float(row["median"]) == pytest.approx(statistics.median(values))
    assert len(per_method) == 6
    for row in per_method:
        medians = [statistics.median(v) for (ft, ev, _), v in groups.items()
                   if ft == row["finetune_type"] and ev == row["evaluation"]]
        assert int(row["n_tasks"]) == 3
        assert float(row["mean"]) == pytest.approx(statistics.mean(medians))
        assert float(row["std"]) == pytest.approx(statistics.pstdev(medians))
    text = (report / "report.md").read_text()
    z_test = statistics.mean(statistics.median(v) for (ft, ev, _), v in groups.items() if ft == "Z" and ev == "test")
    assert f"{z_test:.4g}" in text
    assert "### Per task: test, exact_match" in text


def test_sweep_table_picks_the_best_complete_trial_per_study(built, report):
    best = read_csv(report / "sweep_best.csv")
    assert [r["study"] for r in best] == ["reverse+upper", "copy+sort"]
    for row in best:
        complete = [t for t in built["trials"] if t["study"] == row["study"] and t["status"] == "complete"]
        top = max(complete, key=lambda t: t["mean"])  # the stopped trial's higher mean does not count
        assert row["best_trial"] == top["trial_id"] == f"{row['study']}_t1"
        assert (int(row["trials"]), int(row["complete"])) == (4, 3)
        assert float(row["val_mean"]) == pytest.approx(77.5) and float(row["test_mean"]) == pytest.approx(70.0)
        assert float(row["median_trial_val_mean"]) == pytest.approx(statistics.median(t["mean"] for t in complete))
        assert row["hyper_parameters"] == "module_logits_learning_rate=0.5"


def test_training_curves_and_summary(built, report):
    (summary,) = read_csv(report / "training_summary.csv")  # the fine-tuning run's curves are not pre-training
    loss_rows = [m for m in built["metrics"] if "loss" in m]
    assert float(summary["first_loss"]) == pytest.approx(5.0 - 10 / 50)
    assert float(summary["last_loss"]) == pytest.approx(2.5)  # the resumed row for step 100 wins
    assert float(summary["best_val_loss"]) == pytest.approx(3.0)
    assert int(summary["last_step"]) == 100
    assert float(summary["tokens_per_s"]) == pytest.approx(statistics.mean(m["tokens_per_s"] for m in loss_rows))
    curves = read_csv(report / "training_curves.csv")
    assert len([r for r in curves if r["loss"]]) == 10
    per_task = {r["task"]: float(r["val_loss"]) for r in read_csv(report / "val_loss_per_task.csv")}
    assert per_task == pytest.approx({t: 3.0 + i / 10 for i, t in enumerate(TASKS)})


def test_routing_table_averages_eval_weights_within_layer_groups(built, report):
    rows = read_csv(report / "routing_mhr_pre.csv")
    expected = {}
    for layer, logits in built["logits"].items():
        for t, task in enumerate(TASKS):
            weights = eval_weights(logits[t])
            expected.setdefault((expected_group(layer), task), []).append(
                [sum(w[k] for w in weights) / S for k in range(K)])
    assert {r["group"] for r in rows} == {"encoder self-attention", "encoder FFN", "decoder self-attention",
                                          "decoder cross-attention", "decoder FFN"}
    assert len(rows) == len(expected)
    for row in rows:
        per_layer = expected[(row["group"], row["task"])]
        for k in range(K):
            assert float(row[f"skill_{k}"]) == pytest.approx(sum(v[k] for v in per_layer) / len(per_layer), abs=1e-6)


def test_skill_alignment_table(built, report):
    text = (report / "report.md").read_text()
    assert "Does the routing pick the skills each task is built from?" in text
    # independent v_t: mean over heads and the layers of each group, then over the 5 groups equally
    vectors = {}
    for t, task in enumerate(TASKS):
        per_group = {}
        for layer, logits in built["logits"].items():
            weights = eval_weights(logits[t])
            per_group.setdefault(expected_group(layer), []).append([sum(w[k] for w in weights) / S for k in range(K)])
        group_means = [[sum(v[k] for v in layers) / len(layers) for k in range(K)] for layers in per_group.values()]
        vectors[task] = [sum(g[k] for g in group_means) / len(group_means) for k in range(K)]
    rows = {r["task"]: r for r in read_csv(report / "skills_mhr_pre.csv")}
    assert set(rows) == set(TASKS)  # the held-out composition has no routing row
    for task, v in vectors.items():
        top = sorted(range(K), key=lambda k: -v[k])[:2]
        assert rows[task]["top_skills"].split()[::2] == [str(k) for k in top]
        assert rows[task]["built_from"] == "+".join(PRIMITIVES[task])

    def cosine(a, b):
        a = [x - 1 / K for x in a]
        b = [x - 1 / K for x in b]
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    shared, disjoint = [], []
    for i, a in enumerate(TASKS):
        for b in TASKS[i + 1:]:
            (shared if set(PRIMITIVES[a]) & set(PRIMITIVES[b]) else disjoint).append(cosine(vectors[a], vectors[b]))
    assert len(shared) == 4 and len(disjoint) == 2
    table = {line.split("|")[1].strip(): line.split("|")[2:4]
             for line in text.splitlines() if line.startswith("| share ")}
    assert int(table["share a primitive"][0]) == 4 and int(table["share none"][0]) == 2
    assert float(table["share a primitive"][1]) == pytest.approx(statistics.mean(shared), abs=1e-4)
    assert float(table["share none"][1]) == pytest.approx(statistics.mean(disjoint), abs=1e-4)
    assert statistics.mean(shared) > statistics.mean(disjoint)


def test_figures_are_readable_pngs(report):
    text = (report / "report.md").read_text()
    figures = sorted((report / "figures").glob("*.png"))
    names = {f.name for f in figures}
    assert {"mhr_pre_routing.png", "mhr_pre_curves.png", "mhr_ft_curves.png"} <= names
    # S=2: one per-head figure for each of the 5 groups
    assert len([n for n in names if n.startswith("mhr_pre_routing_")]) == 5
    for figure in figures:
        assert f"(figures/{figure.name})" in text
        with Image.open(figure) as image:
            image.verify()
        with Image.open(figure) as image:
            assert image.format == "PNG"
            assert image.width >= 300 and image.height >= 200
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # not a blank canvas


def test_head_cap_and_folder_of_runs(suite, tmp_path):
    pre = suite["pre"]
    save_poly_adapters(pre / "final", 16, lambda _: torch.randn(len(TASKS), 16 * K).tolist(), modify_layers="q")
    out = tmp_path / "wide"
    assert main(["report", str(suite["runs"]), "--out", str(out), "--max-heads", "4"]) == 0
    text = (out / "report.md").read_text()
    assert "4 of 16 heads" in text
    for run in ("mhr_pre", "mhr_ft", "sweep_z"):  # the folder of runs expanded to its runs
        assert f"| {run} |" in text
    with Image.open(out / "figures" / "mhr_pre_routing_0_encoder_self-attention.png") as image:
        assert image.width > 600


def test_not_a_run_folder_is_a_one_line_error(tmp_path, capsys):
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "readme.txt").write_text("hello")
    assert main(["report", str(empty), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mttl: error: ") and err.count("\n") == 1
    assert str(empty) in err and "results.jsonl" in err and "metrics.jsonl" in err
    assert not (tmp_path / "r").exists()


def test_report_replaces_only_its_own_files_or_leaves_the_folder_alone(suite, capsys):
    report = suite["tmp"] / "report"
    assert main(["report", str(suite["ft"]), str(suite["sweep"]), "--out", str(report)]) == 0
    (report / "notes.txt").write_text("mine")  # the user's file, next to the report's
    assert main(["report", str(suite["ft"]), "--out", str(report)]) == 0
    assert (report / "notes.txt").read_text() == "mine" and (report / "results_per_task.csv").is_file()
    assert not (report / "sweep_best.csv").exists()  # the previous report's file this one does not write
    assert not list(report.parent.glob(".report.*"))
    (report / "sweep_best.csv").write_text("mine too")  # a user file where the next report writes one
    capsys.readouterr()
    assert main(["report", str(suite["ft"]), str(suite["sweep"]), "--out", str(report)]) == 2
    assert "sweep_best.csv, which mttl report did not write" in capsys.readouterr().err
    assert (report / "sweep_best.csv").read_text() == "mine too"
    keep = suite["tmp"] / "precious"
    keep.mkdir()
    (keep / "thesis.tex").write_text("do not lose")
    capsys.readouterr()
    assert main(["report", str(suite["ft"]), "--out", str(keep)]) == 2
    assert "not a report folder" in capsys.readouterr().err
    assert (keep / "thesis.tex").read_text() == "do not lose"
    assert main(["report", str(suite["ft"]), "--out", str(keep / "thesis.tex")]) == 2
    assert "not a report folder" in capsys.readouterr().err


def test_mismatched_adapters_json_names_the_file(suite, tmp_path, capsys):
    description = json.loads((suite["pre"] / "final" / "adapters.json").read_text())
    description["adapter_config"]["n_splits"] = 4
    (suite["pre"] / "final" / "adapters.json").write_text(json.dumps(description))
    assert main(["report", str(suite["pre"]), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "adapters.safetensors" in err and "n_splits=4" in err
