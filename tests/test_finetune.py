"""Few-shot fine-tuning: every finetune type end-to-end on a held-out synthetic task and on T0 CB.

Checkpoints are real run folders (config.json, tasks.json, final/adapters.*, final/backbone/)
written from a tiny T5 with the adapters of each kind, as `mttl pretrain` lays them out.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import shared_path
from mttl.adapters import save_adapters, selectors
from mttl.adapters.routing import AverageSelector
from mttl.cli import main
from mttl.config import Config
from mttl.errors import ConfigError
from mttl.finetune.types import load_for_finetuning
from mttl.models.backbone import load_backbone
from mttl.models.run import build_routed_model
from mttl.models.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"model": "tiny-t5", "tokenizer": "byte", "tiny_d_model": 64, "tiny_num_layers": 2, "lora_rank": 2,
        "n_skills": 4, "n_splits": 2, "max_input_length": 64, "max_output_length": 24}
FAST = ["seeds=[13]", "total_steps=4", "train_batch_size=4", "eval_every_epochs=1", "num_shots=8", "num_beams=1",
        "predict_batch_size=16", "tensorboard=False", "log_every=2"]
ROUTED_TRAINABLE = ".*lora_[ab].*|.*module_logits.*"


def make_checkpoint(root: Path, data_dir: Path, modifier: str | None, *, dataset: str = "synthetic",
                    n_tasks: int = 3, seed: int = 0, task_names: list[str] | None = None) -> Path:
    """A finished pre-training run folder for a tiny T5 with `modifier` adapters (random, non-zero B)."""
    run = root / f"ckpt_{modifier or 'full'}"
    cfg = Config().update({**TINY, "model_modifier": modifier, "n_tasks": n_tasks, "data_dir": str(data_dir),
                           "dataset": dataset, "lora_randb_init": True, "seed": seed,
                           "trainable_param_names": ROUTED_TRAINABLE if modifier else ".*"})
    torch.manual_seed(seed)
    model = build_routed_model(cfg, load_tokenizer("byte"))
    (run / "final").mkdir(parents=True)
    cfg.save(run)
    names = task_names or [f"pretrain_task_{i}" for i in range(n_tasks)]
    (run / "tasks.json").write_text(json.dumps({name: i for i, name in enumerate(names)}))
    if modifier:
        save_adapters(model, run / "final")
    # the backbone alone, as pretrain saves it (tiny-t5 weights depend on the seed only)
    load_backbone("tiny-t5", vocab_size=len(load_tokenizer("byte")), tiny_d_model=TINY["tiny_d_model"],
                  tiny_num_layers=TINY["tiny_num_layers"], seed=seed).save_pretrained(run / "final" / "backbone")
    return run


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from mttl.data.shards import read_manifest
    from mttl.data.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    prepare_synthetic(out, seed=0, n_heldout=2, rows_per_task=16, warmup_rows_per_task=8, validation_rows=4,
                      heldout_pool=32, heldout_validation=8, heldout_test=8)
    held_out = sorted(t for t, m in read_manifest(out)["tasks"].items() if m["role"] == "test")
    return out, held_out[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, synthetic):
    root = tmp_path_factory.mktemp("runs")
    return {kind: make_checkpoint(root, synthetic[0], kind) for kind in ("poly", "lora", None)}


def _results(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("finetune_type,ckpt,extra", [
    ("F", "poly", []), ("A", None, ["model_modifier=ia3"]), ("Z", "poly", []), ("MuZ", "poly", []),
    ("PolyRand", "poly", []), ("Poly", "poly", []), (None, "poly", []),
])
def test_every_finetune_type_end_to_end_on_synthetic(tmp_path, synthetic, checkpoints, finetune_type, ckpt, extra):
    data_dir, task = synthetic
    args = ["finetune", "-k", f"checkpoint={checkpoints[ckpt]}", f"finetune_task_name={task}",
            f"output_dir={tmp_path}", "run_name=ft", *FAST, *extra]
    if finetune_type:
        args.append(f"finetune_type={finetune_type}")
    assert main(args) == 0
    run_dir = tmp_path / "ft"
    rows = _results(run_dir)
    assert [r["evaluation"] for r in rows] == ["zero_shot", "best_val", "test"]
    assert {r["task"] for r in rows} == {task} and {r["seed"] for r in rows} == {13}
    assert {r["finetune_type"] for r in rows} == {finetune_type or "Poly"}
    assert all(r["metric"] == "exact_match" and 0 <= r["value"] <= 100 for r in rows)
    assert all(r["value"] == r["exact_match"] and 0 <= r["rougeL"] <= 100 for r in rows)  # NI reports both
    best, test = rows[1], rows[2]
    assert (test["step"], test["epoch"]) == (best["step"], best["epoch"])  # the best validation weights are tested
    with open(run_dir / "results.csv") as f:
        assert [r["evaluation"] for r in csv.DictReader(f)] == ["zero_shot", "best_val", "test"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["lora_rank"] == 2 and saved["tiny_d_model"] == 64  # inherited from the checkpoint
    assert any('"val/exact_match"' in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def _cfg(checkpoint: Path, **kw) -> Config:
    return Config().update({"checkpoint": str(checkpoint), **kw})


def _adapter_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_finetune_types_train_the_right_weights(checkpoints):
    poly = checkpoints["poly"]
    z = load_for_finetuning(_cfg(poly, finetune_type="Z")).model
    trained = [n for n, p in z.named_parameters() if p.requires_grad]
    assert trained and all("module_logits" in n for n in trained)
    assert all(s.module_logits.shape[0] == 1 for s in selectors(z).values())  # one fresh row for the new task

    mu = load_for_finetuning(_cfg(poly, finetune_type="MuZ")).model
    assert all(isinstance(s, AverageSelector) for s in selectors(mu).values())
    assert {n for n, p in mu.named_parameters() if p.requires_grad} == {n for n in _adapter_state(mu)}

    full = load_for_finetuning(_cfg(poly, finetune_type="F")).model
    assert all(p.requires_grad for p in full.parameters())

    pretrained = _adapter_state(load_for_finetuning(_cfg(poly, finetune_type="Poly")).model)
    torch.manual_seed(1)
    fresh = _adapter_state(load_for_finetuning(_cfg(poly, finetune_type="PolyRand")).model)
    assert pretrained.keys() == fresh.keys()
    assert not all(torch.equal(pretrained[k], fresh[k]) for k in pretrained)
    assert all(torch.equal(pretrained[k], _adapter_state(z)[k]) for k in pretrained)  # Z keeps the pre-trained skills

    ia3 = load_for_finetuning(Config().update({"checkpoint": str(checkpoints[None]), "finetune_type": "A",
                                               "model_modifier": "ia3"})).model
    trained = [n for n, p in ia3.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith("multi_lora_b") for n in trained)

    from mttl.models.run import load_run

    lora = load_for_finetuning(_cfg(checkpoints["lora"], finetune_type="A")).model  # the run's own LoRA, trained
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    saved = _adapter_state(load_run(checkpoints["lora"]).model)
    assert trained == set(saved) and all(torch.equal(saved[k], _adapter_state(lora)[k]) for k in saved)


def test_user_keys_win_over_the_checkpoint(checkpoints):
    ft = load_for_finetuning(_cfg(checkpoints["poly"], finetune_type="PolyRand", lora_rank=3, learning_rate=0.5))
    assert ft.cfg.lora_rank == 3 and ft.cfg.n_splits == 2 and ft.cfg.learning_rate == 0.5


@pytest.mark.parametrize("ckpt,kw,match", [
    (None, {"finetune_type": "Z"}, "needs a routed checkpoint"),
    ("poly", {"finetune_type": "A"}, "is routed"),
    (None, {"finetune_type": "A"}, "model_modifier=ia3"),
])
def test_impossible_type_and_checkpoint_pairs_are_user_errors(checkpoints, ckpt, kw, match):
    with pytest.raises(ConfigError, match=match):
        load_for_finetuning(_cfg(checkpoints[ckpt], **kw))


def test_cli_prints_one_line_error(tmp_path, checkpoints, capsys):
    code = main(["finetune", "-k", f"checkpoint={checkpoints[None]}", "finetune_task_name=x", "finetune_type=Z",
                 f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mttl: error:") and "Traceback" not in err


def t0_cb_subset(root: Path, n_fewshot: int | None = None) -> Path:
    """CB from the shared T0 folder with its T-Few seed-42 split, test rows thinned for 2 cores.

    With `n_fewshot`, only that many few-shot rows are kept (saved as `fewshot_k<n>_seed42`), so an
    epoch is a couple of steps and a short run validates several times."""
    from mttl.data import shards
    from mttl.data.t0 import prepare_t0

    manifest = prepare_t0(shared_path("data", "t0"), out=root / "t0_full", tasks=["cb"])
    rows = shards.read_rows(root / "t0_full", tasks=["cb"], splits=["test", "fewshot_k32_seed42"]).to_pylist()
    test_rows = [r for r in rows if r["split"] == "test"][::35]  # 24 of 840 rows, every template
    fewshot = [r for r in rows if r["split"] == "fewshot_k32_seed42"]
    if n_fewshot:
        fewshot = [{**r, "split": f"fewshot_k{n_fewshot}_seed42"}
                   for r in fewshot[::len(fewshot) // n_fewshot][:n_fewshot]]
    meta = {k: v for k, v in manifest["tasks"]["cb"].items() if k != "rows"}
    shards.write_prepared(root / "t0_cb", fewshot + test_rows, {"cb": meta}, source="t0-test-subset", args={})
    return root / "t0_cb"


@pytest.fixture(scope="module")
def t0_cb(tmp_path_factory):
    return t0_cb_subset(tmp_path_factory.mktemp("t0"))


def test_t0_cb_with_tfew_losses_every_type(tmp_path_factory, t0_cb):
    root = tmp_path_factory.mktemp("t0_runs")
    ckpts = {kind: make_checkpoint(root, t0_cb, kind, dataset="t0") for kind in ("poly", None)}
    for finetune_type in ("F", "A", "Z", "MuZ", "PolyRand", "Poly"):
        out = root / f"out_{finetune_type}"
        extra = ["model_modifier=ia3"] if finetune_type == "A" else []
        ckpt = ckpts[None] if finetune_type == "A" else ckpts["poly"]
        args = ["finetune", "-k", f"checkpoint={ckpt}", "finetune_task_name=cb", f"finetune_type={finetune_type}",
                f"output_dir={out}", "run_name=cb", "seeds=[42]", "total_steps=2", "train_batch_size=4",
                "eval_every_epochs=1", "predict_batch_size=8", "tensorboard=False", "mc_loss=1",
                "unlikely_loss=1", "length_norm=1", "max_input_length=96", *extra]
        assert main(args) == 0
        rows = _results(out / "cb")
        assert [r["evaluation"] for r in rows] == ["zero_shot", "best_val", "test"]
        assert all(r["metric"] == "accuracy" and 0 <= r["value"] <= 100 for r in rows)
        assert {r["seed"] for r in rows} == {42}


def test_rerun_keeps_finished_seeds_and_runs_the_rest(tmp_path, synthetic, checkpoints):
    data_dir, task = synthetic
    common = ["finetune", "-k", f"checkpoint={checkpoints['poly']}", f"finetune_task_name={task}",
              f"output_dir={tmp_path}", "run_name=ft", "finetune_type=Z", *FAST]
    assert main(common) == 0
    first = _results(tmp_path / "ft")
    assert main([*common, "seeds=[13,42]"]) == 0
    rows = _results(tmp_path / "ft")
    assert rows[:3] == first  # seed 13 kept as written, not run again
    assert [(r["seed"], r["evaluation"]) for r in rows[3:]] == [(42, "zero_shot"), (42, "best_val"), (42, "test")]


def test_checkpoint_saved_with_average_routing(tmp_path, synthetic):
    """A `switch_to_avg_modules` run: MuZ trains its averaged adapters; routing types are refused."""
    from mttl.adapters import ops
    from mttl.models.run import load_run

    run = make_checkpoint(tmp_path, synthetic[0], "poly")
    loaded = load_run(run)
    ops.switch_to_average(loaded.model)
    save_adapters(loaded.model, run / "final")
    mu = load_for_finetuning(_cfg(run, finetune_type="MuZ")).model
    assert all(isinstance(s, AverageSelector) for s in selectors(mu).values())
    assert any(p.requires_grad for p in mu.parameters())
    with pytest.raises(ConfigError, match="finetune_type=MuZ"):
        load_for_finetuning(_cfg(run, finetune_type="Z"))


def test_ni_generation_task_scored_with_rouge(tmp_path):
    """A held-out Super-NI task (thinned for 2 cores): beam search, Rouge-L as the metric, EM beside it."""
    from mttl.data import shards
    from mttl.data.ni import prepare_ni

    manifest = prepare_ni(shared_path("data", "natural-instructions"), tmp_path / "ni_full", split="available",
                          max_instances_per_task=8, test_instances=6, validation_per_task=4, tokenizer="byte",
                          max_input_length=128)
    task = sorted(t for t, m in manifest["tasks"].items() if m["role"] == "test")[0]
    rows = shards.read_rows(tmp_path / "ni_full", tasks=[task]).to_pylist()
    keep = [r for r in rows if r["split"] == "validation"][:14] + [r for r in rows if r["split"] == "test"][:6]
    shards.write_prepared(tmp_path / "ni", keep, {task: manifest["tasks"][task]}, source="ni-test-subset", args={})
    checkpoint = make_checkpoint(tmp_path, tmp_path / "ni", "poly", dataset="ni")
    assert main(["finetune", "-k", f"checkpoint={checkpoint}", f"finetune_task_name={task}", f"output_dir={tmp_path}",
                 "run_name=ni", *FAST, "num_beams=2", "max_output_length=8"]) == 0
    rows = _results(tmp_path / "ni")
    assert [r["evaluation"] for r in rows] == ["zero_shot", "best_val", "test"]
    assert all(r["metric"] == "rougeL" and r["value"] == r["rougeL"] and "exact_match" in r for r in rows)


def test_a_run_stopped_after_a_lap_continues_exactly_as_one_that_never_stopped(tmp_path, synthetic, checkpoints):
    """What a sweep's start race relies on (`mttl.sweep.race_start_points`): stop after 2 validations,
    save the state to a file, continue in a fresh model: the same validations, best validation and
    test score, to the last digit, as the run that never stopped; a state continues only its own run."""
    import random

    from mttl.finetune.loop import finetune_seed

    data_dir, task = synthetic
    cfg = _cfg(checkpoints["poly"], finetune_task_name=task, total_steps=10, train_batch_size=4, num_shots=8,
               eval_every_epochs=1, do_zs=True, learning_rate=3e-2, tensorboard=False)
    whole_seen: list[dict] = []
    whole = finetune_seed(cfg, task, 13, on_validation=whole_seen.append)
    assert len(whole_seen) == 5  # 8 shots at batch 4: 2 steps an epoch, a validation each

    laps: list[dict] = []
    lap_seen: list[dict] = []
    lap = finetune_seed(cfg, task, 13, on_validation=lap_seen.append, stop_after_validations=2, on_lap=laps.append)
    assert [r["evaluation"] for r in lap] == ["zero_shot", "best_val"] and lap[1]["trained_steps"] == 4
    assert lap_seen == whole_seen[:2] and len(laps) == 1
    torch.save(laps[0], tmp_path / "lap.pt")
    torch.manual_seed(1234), random.seed(99)  # whatever ran in between draws other numbers
    state = torch.load(tmp_path / "lap.pt", weights_only=True)  # no pickled objects in a lap's state

    seen: list[dict] = []
    continued = finetune_seed(cfg, task, 13, on_validation=seen.append, resume=state)
    assert seen == whole_seen  # the lap's validations are reported again, then the rest
    assert continued == whole
    assert len({r["value"] for r in whole_seen}) > 1 or len({r["loss"] for r in whole_seen}) == 5  # it trained

    with pytest.raises(ConfigError, match="cannot continue task .* seed 42"):
        finetune_seed(cfg, task, 42, resume=state)
