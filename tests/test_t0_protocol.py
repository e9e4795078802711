"""The reference's T0 protocol: the training mixture's per-dataset cap and blacklist, k-shot draws
of whole instances (ANLI 32 of the 50-shot files), an epoch of k instances with a template drawn
afresh each time, validations only every `eval_every_epochs`, and the T0 few-shot presets.

Expected values come from the reference's written rules (REFERENCE.md §4.2, §5.3, §3.3; T0's
TASK_BLACKLIST) and from the shared T-Few files read directly, not from the code under test.
"""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from conftest import shared_path
from mttl.config import Config
from mttl.data import shards
from mttl.data.fewshot import fewshot_split, group_instances
from mttl.data.t0 import prepare_t0
from mttl.errors import DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GIGAWORD = """dataset: gigaword
templates:
{entries}
"""
ENTRY = """  {id}: !Template
    answer_choices: null
    id: {id}
    jinja: '{prefix} {{{{document}}}} ||| {{{{summary}}}}'
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics: [ROUGE]
      original_task: true
    name: {name}
    reference: ''
"""


def _gigaword_templates(root: Path, names: list[str]) -> Path:
    folder = root / "templates" / "gigaword"
    folder.mkdir(parents=True)
    entries = "".join(ENTRY.format(id=f"t{i}", prefix=f"T{i}:", name=name) for i, name in enumerate(names))
    (folder / "templates.yaml").write_text(GIGAWORD.format(entries=entries))
    return root / "templates"


# "summarize_" is T0's blacklisted P3 task `gigaword_summarize_` (broken cached files)
NAMES = ["summarize_", "make_a_title", "TLDR"]


def test_raw_dataset_cap_is_per_dataset_and_blacklist_applies(tmp_path):
    templates = _gigaword_templates(tmp_path, NAMES)
    source = tmp_path / "source"
    (source / "gigaword").mkdir(parents=True)
    n_rows = 10
    (source / "gigaword" / "train.jsonl").write_text(
        "".join(json.dumps({"document": f"doc {i}", "summary": f"sum {i}"}) + "\n" for i in range(n_rows)))
    manifest = prepare_t0(source, templates, tmp_path / "out", use_t0_templates_as_tasks=True, examples_per_dataset=12)
    # the reference: every template of the dataset gets the same first min(size, 12 // 3 templates) = 4 rows
    cap = min(n_rows, 12 // len(NAMES))
    assert cap == 4
    rows = shards.read_rows(tmp_path / "out").to_pylist()
    by_task = Counter(r["task_name"] for r in rows)
    assert by_task == {"gigaword/make_a_title": cap, "gigaword/TLDR": cap}  # blacklisted template left out
    for task in by_task:
        sources = sorted(r["source"] for r in rows if r["task_name"] == task)
        prefix = "T1:" if task.endswith("title") else "T2:"
        assert sources == sorted(f"{prefix} doc {i}" for i in range(cap))  # the same first rows for every template
    assert manifest["skipped"]["blacklisted"] == {"gigaword_summarize_": cap}
    assert "gigaword/summarize_" not in manifest["tasks"]


def test_p3_mixture_cap_is_per_dataset_and_blacklist_applies(tmp_path):
    templates = _gigaword_templates(tmp_path, NAMES)
    source = tmp_path / "source"
    (source / "train_mixture").mkdir(parents=True)
    lines = [{"template": f"gigaword_{name}", "source": f"{name} doc {i}", "target": f"sum {i}"}
             for name in NAMES for i in range(9)]
    random.Random(0).shuffle(lines)  # P3 files interleave templates; order within a template is the dataset's
    lines.sort(key=lambda r: int(r["source"].rsplit(" ", 1)[1]))
    (source / "train_mixture" / "p3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    manifest = prepare_t0(source, templates, tmp_path / "out", examples_per_dataset=10)
    cap = min(9, 10 // len(NAMES))  # 3 rows per template, per-dataset budget of 10
    rows = shards.read_rows(tmp_path / "out").to_pylist()
    assert {r["task_name"] for r in rows} == {"gigaword"}
    assert sorted(r["source"] for r in rows) == sorted(f"{n} doc {i}" for n in NAMES[1:] for i in range(cap))
    assert manifest["skipped"]["blacklisted"] == {"gigaword_summarize_": 9}


def test_shared_sample_mixture_shares_under_the_cap(tmp_path):
    """The shared P3 sample (≤ 200 rows per template) is under every cap: all rows stay."""
    source = tmp_path / "source"
    source.mkdir()
    for part in ("train_mixture", "promptsource_templates"):
        (source / part).symlink_to(shared_path("data", "t0", part))
    with gzip.open(shared_path("data", "t0", "train_mixture", "t0_train_sample.jsonl.gz"), "rt") as fh:
        n_lines = sum(1 for line in fh if line.strip())
    manifest = prepare_t0(source, out=tmp_path / "out")
    assert sum(sum(m["rows"].values()) for m in manifest["tasks"].values()) == n_lines


# --------------------------------------------------------------------------- k-shot draws


def _templated_ids(rows) -> Counter:
    return Counter(r["instance_id"].rsplit("/", 1)[0] for r in rows)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t0_protocol")
    source = tmp / "source"
    source.mkdir()
    for part in ("heldout_eval", "heldout_fewshot", "promptsource_templates"):
        (source / part).symlink_to(shared_path("data", "t0", part))
    manifest = prepare_t0(source, out=tmp / "out", tasks=["cb", "anli-r1"], storycloze_dir="")
    return tmp / "out", manifest


def _fewshot_file(task: str, k: int, seed: int) -> list[dict]:
    path = shared_path("data", "t0", "heldout_fewshot", task, f"{k}_shot", f"{seed}_seed.jsonl.gz")
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_anli_defaults_to_32_shots_drawn_from_the_50_shot_file(heldout):
    from mttl.finetune.loop import num_shots

    out, manifest = heldout
    t0 = Config().copy(dataset="t0")
    assert num_shots(t0, manifest["tasks"]["anli-r1"], 42, "anli-r1") == 32  # the reference's k for ANLI
    assert num_shots(t0, manifest["tasks"]["cb"], 42, "cb") == 32
    assert num_shots(t0.copy(num_shots=8), manifest["tasks"]["anli-r1"], 42, "anli-r1") == 8
    n_templates = manifest["tasks"]["anli-r1"]["rows_per_instance"]
    assert len(_fewshot_file("anli-r1", 50, 42)) == 50
    # ANLI's test sets are not shared: a few rows of another seed's file stand in as its test split
    rows = shards.read_rows(out, tasks=["anli-r1"]).to_pylist()
    stand_in = [{**r, "split": "test"} for r in rows if r["split"] == "fewshot_k50_seed1"][:3]
    meta = {k: v for k, v in manifest["tasks"]["anli-r1"].items() if k != "rows"}
    shards.write_prepared(out.parent / "anli", rows + stand_in, {"anli-r1": meta}, source="test", args={})
    draws = {}
    for seed in (42, 1024, 0):
        train, validation, test = fewshot_split(out.parent / "anli", "anli-r1", 32, seed)
        per_instance = _templated_ids(train)
        assert len(per_instance) == 32  # 32 instances, each with its renderings
        assert all(n <= n_templates for n in per_instance.values()) and len(train) > 32 * (n_templates - 2)
        assert all(i.startswith(f"anli-r1/fewshot_k50_seed{seed}/") for i in per_instance)
        draws[seed] = set(per_instance)
        assert fewshot_split(out.parent / "anli", "anli-r1", 32, seed)[0] == train  # seeded
    assert draws[42] != draws[1024]


def test_any_k_up_to_the_shipped_file_works_for_every_task(heldout):
    out, manifest = heldout
    train, _, _ = fewshot_split(out, "cb", 16, 42)
    assert len(_templated_ids(train)) == 16
    assert set(_templated_ids(train)) <= {f"cb/fewshot_k32_seed42/{i}" for i in range(32)}
    full, _, _ = fewshot_split(out, "cb", 32, 42)
    assert len(_templated_ids(full)) == 32 == len(_fewshot_file("cb", 32, 42))
    with pytest.raises(DataError, match="'cb': 33 shots asked for seed 42.*fewshot_k32_seed42") as err:
        fewshot_split(out, "cb", 33, 42)
    assert "\n" not in str(err.value)


def test_an_epoch_is_k_instances_with_a_template_drawn_each_time(heldout):
    from mttl.finetune.loop import _train_batches

    out, manifest = heldout
    train, _, _ = fewshot_split(out, "cb", 32, 42)
    n_templates = manifest["tasks"]["cb"]["rows_per_instance"]
    assert len(train) == 32 * n_templates  # the split holds every (instance, template) rendering
    instances = group_instances(train, templated=True)
    rng = random.Random(0)
    seen_templates = Counter()
    for _ in range(20):
        epoch = [row for batch in _train_batches(instances, 8, rng) for row in batch]
        assert len(epoch) == 32  # k rows per epoch (4 batches of 8), not 32 × templates
        keys = _templated_ids(epoch)
        assert len(keys) == 32 and set(keys.values()) == {1}
        seen_templates.update(r["instance_id"] for r in epoch)
    # a fresh template each epoch: over 20 epochs an instance meets several of its templates
    assert len(seen_templates) > 32 * 5


# -------------------------------------------------------------------- validation schedule


@pytest.mark.parametrize("shots,steps,every,expected", [(12, 20, 2, 3), (8, 8, 2, 2), (8, 3, 5, 1)])
def test_validations_only_every_n_epochs(tmp_path_factory, shots, steps, every, expected):
    """Epoch = ⌊k / batch⌋ steps; validations at multiples of `every` epochs, none extra at the end
    (the reference's check_val_every_n_epoch); a run too short for one validates once at the end."""
    from test_finetune import make_checkpoint, t0_cb_subset

    from mttl.finetune.loop import finetune_seed

    root = tmp_path_factory.mktemp("t0_val")
    data = t0_cb_subset(root)
    ckpt = make_checkpoint(root, data, "poly", dataset="t0")
    cfg = Config().update({"checkpoint": str(ckpt), "finetune_task_name": "cb", "total_steps": steps,
                           "train_batch_size": 4, "eval_every_epochs": every, "num_shots": shots,
                           "max_input_length": 64, "do_zs": False, "tensorboard": False})
    seen = []
    finetune_seed(cfg, "cb", 42, on_validation=seen.append)
    steps_per_epoch = shots // 4
    epochs = steps / steps_per_epoch
    assert len(seen) == expected == max(int(epochs // every), 1)
    if epochs >= every:
        assert [r["epoch"] for r in seen] == [every * (i + 1) for i in range(expected)]


# ----------------------------------------------------------------------------- presets


REFERENCE_T0_FINETUNE = {  # the reference's configs/t0/finetune.json (REFERENCE.md §3.3)
    "optimizer": "adafactor", "warmup_proportion": 0.06, "total_steps": 1000, "learning_rate": 3e-3,
    "max_grad_norm": 1, "weight_decay": 0, "precision": "bf16", "dataset": "t0",
}
# the reference's configs/t0/<task>.json: batch 8, predict 16, T-Few loss weights 1 and length_norm 1;
# h-swag: micro batch 4 × 2 accumulation steps = a global batch of 8 in this repo's terms
REFERENCE_T0_TASK = {"train_batch_size": 8, "predict_batch_size": 16, "gradient_accumulation_steps": 1,
                     "length_norm": 1, "mc_loss": 1, "unlikely_loss": 1, "dataset": "t0"}
T0_TASKS = ["cb", "rte", "copa", "wic", "wsc", "winogrande", "h-swag", "anli-r1", "anli-r2", "anli-r3", "storycloze"]
CONFIGS = Path(__file__).resolve().parent.parent / "mttl" / "configs"


def test_shipped_t0_finetune_configs_hold_the_reference_values():
    assert json.loads((CONFIGS / "t0" / "finetune.json").read_text()) == REFERENCE_T0_FINETUNE
    for task in T0_TASKS:
        want = {**REFERENCE_T0_TASK, "finetune_task_name": task}
        if task == "h-swag":
            want["gradient_accumulation_steps"] = 2
        assert json.loads((CONFIGS / "t0" / f"{task}.json").read_text()) == want, task
    ia3 = {"model_modifier": "ia3", "modify_modules": ".*SelfAttention|.*EncDecAttention|.*DenseReluDense",
           "modify_layers": "k|v|wi_1.*", "trainable_param_names": ".*lora_b.*"}  # the reference's t0/ia3.json
    assert json.loads((CONFIGS / "t0" / "ia3.json").read_text()) == ia3
    assert json.loads((CONFIGS / "ni" / "ia3.json").read_text()) == ia3


@pytest.mark.parametrize("task", T0_TASKS)
def test_t0_runs_without_a_config_use_the_t0_presets(task):
    """What `mttl finetune` / `evaluate` merge for a T0 checkpoint when the user gives no -c file
    equals the shipped `-c t0/finetune.json+t0/<task>.json` (precision aside: not read there)."""
    from mttl.config import load_config
    from mttl.finetune.types import finetune_config

    run_cfg = Config().copy(dataset="t0", model="tiny-t5", model_modifier="poly")
    bare = finetune_config(run_cfg, Config().copy(finetune_task_name=task))
    shipped = finetune_config(run_cfg, load_config(f"t0/finetune.json+t0/{task}.json"))
    keys = (set(REFERENCE_T0_FINETUNE) | set(REFERENCE_T0_TASK)) - {"precision", "dataset"}
    assert {k: getattr(bare, k) for k in keys} == {k: getattr(shipped, k) for k in keys}
    assert bare.length_norm == 1 and bare.optimizer == "adafactor" and bare.total_steps == 1000
    user = finetune_config(run_cfg, Config().copy(finetune_task_name=task, length_norm=0.0, learning_rate=1e-4))
    assert user.length_norm == 0.0 and user.learning_rate == 1e-4  # the user's own keys win
    ni = finetune_config(run_cfg.copy(dataset="ni"), Config().copy(finetune_task_name=task))
    assert ni.length_norm == 0.0 and ni.optimizer == "adamw"  # other datasets keep the defaults


def test_ia3_on_a_plain_checkpoint_adapts_k_v_wi_1_only(tmp_path_factory):
    from test_finetune import make_checkpoint, t0_cb_subset

    from mttl.finetune.types import load_for_finetuning

    root = tmp_path_factory.mktemp("ia3")
    ckpt = make_checkpoint(root, t0_cb_subset(root), None, dataset="t0")
    ft = load_for_finetuning(Config().update({"checkpoint": str(ckpt), "finetune_type": "A",
                                              "model_modifier": "ia3"}))
    adapted = {n.rsplit(".", 2)[-2] for n, p in ft.model.named_parameters() if p.requires_grad}
    assert adapted and adapted <= {"k", "v", "wi_1"} and {"k", "v"} <= adapted
    assert (ft.cfg.modify_layers, ft.cfg.modify_modules) == ("k|v|wi_1.*", REFERENCE_IA3_MODULES)


REFERENCE_IA3_MODULES = ".*SelfAttention|.*EncDecAttention|.*DenseReluDense"
