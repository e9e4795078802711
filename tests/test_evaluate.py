"""`mttl evaluate`: seen tasks keep their routing row, unseen tasks get average routing (MHR-µ zero-shot)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from mttl.adapters import selectors
from mttl.cli import main
from mttl.data.fewshot import eval_rows
from mttl.data.shards import read_manifest
from mttl.evaluation.metrics import generation_metrics, row_references
from mttl.evaluation.predict import generate
from mttl.models.run import load_run
from test_finetune import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = ["num_beams=1", "predict_batch_size=16", "max_output_length=16", "tensorboard=False"]


def test_evaluate_seen_and_unseen_tasks(tmp_path, ray_cluster, capsys):
    from mttl.data.synthetic import prepare_synthetic

    data = tmp_path / "data"
    prepare_synthetic(data, seed=1, n_heldout=1, rows_per_task=8, warmup_rows_per_task=4, validation_rows=6,
                      heldout_pool=8, heldout_validation=4, heldout_test=6)
    tasks = read_manifest(data)["tasks"]
    seen = sorted(t for t, m in tasks.items() if m["role"] == "train")[0]
    unseen = sorted(t for t, m in tasks.items() if m["role"] == "test")[0]
    checkpoint = make_checkpoint(tmp_path, data, "poly", n_tasks=2, task_names=["other", seen])
    with torch.no_grad():  # learned-looking routing so rows and the average differ, saved back as the run's
        from mttl.adapters import save_adapters

        loaded = load_run(checkpoint)
        for selector in selectors(loaded.model).values():
            selector.module_logits.normal_(0, 3)
        save_adapters(loaded.model, checkpoint / "final")

    assert main(["evaluate", "-k", f"checkpoint={checkpoint}", f"tasks=['{unseen}','{seen}']",
                 f"output_dir={tmp_path}", "run_name=ev", *SETTINGS]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    by_task = {r["task"]: r for r in rows}
    assert by_task[seen]["finetune_type"] == "seen_routing" and by_task[unseen]["finetune_type"] == "average_routing"
    assert all(r["evaluation"] == "zero_shot" and r["metric"] == "exact_match" for r in rows)
    with open(tmp_path / "ev" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2

    # independent: the seen task through its own routing row; the unseen one with every router's
    # logits set equal, i.e. weights 1/K on every head, the definition of average routing
    fresh = load_run(checkpoint)
    model, tokenizer = fresh.model, fresh.tokenizer
    kwargs = dict(num_beams=1, max_input_length=512, max_output_length=16, batch_size=16)
    seen_rows = eval_rows(data, seen, "validation")
    want_seen = generation_metrics(generate(model, tokenizer, seen_rows, 1, **kwargs),
                                   [row_references(r) for r in seen_rows])["exact_match"]
    with torch.no_grad():
        for selector in selectors(model).values():
            selector.module_logits.zero_()
    unseen_rows = eval_rows(data, unseen, "test")
    want_unseen = generation_metrics(generate(model, tokenizer, unseen_rows, 0, **kwargs),
                                     [row_references(r) for r in unseen_rows])["exact_match"]
    assert by_task[seen]["value"] == pytest.approx(want_seen)
    assert by_task[unseen]["value"] == pytest.approx(want_unseen)

    # the same command again scores nothing: the run folder is left exactly as it was
    written = (tmp_path / "ev" / "results.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["evaluate", "-k", f"checkpoint={checkpoint}", f"tasks=['{unseen}','{seen}']",
                 f"output_dir={tmp_path}", "run_name=ev", *SETTINGS]) == 0
    assert "2 of 2 tasks already scored" in capsys.readouterr().out
    assert (tmp_path / "ev" / "results.jsonl").read_bytes() == written
    # a key that changes the scores (a shorter generation limit) scores both tasks again
    assert main(["evaluate", "-k", f"checkpoint={checkpoint}", f"tasks=['{unseen}','{seen}']",
                 f"output_dir={tmp_path}", "run_name=ev", *SETTINGS, "max_output_length=1"]) == 0
    assert "already scored" not in capsys.readouterr().out
    assert len((tmp_path / "ev" / "results.jsonl").read_text().splitlines()) == 2

    # one Ray task per task on the session's cluster: each loads the run itself and must route its
    # task as above (its own row when seen, the average otherwise), with a progress line per task
    address = ray_cluster.get_runtime_context().gcs_address
    assert main(["evaluate", "-k", f"checkpoint={checkpoint}", f"tasks=['{unseen}','{seen}']",
                 f"output_dir={tmp_path}", "run_name=ev_ray", f"ray_address={address}",
                 "resources_per_run={'CPU': 1}", *SETTINGS]) == 0
    out = capsys.readouterr().out
    assert "scoring 2 tasks as Ray tasks" in out and "[2/2]" in out, out
    fanned = {r["task"]: r for r in map(json.loads, (tmp_path / "ev_ray" / "results.jsonl").read_text().splitlines())}
    assert {t: (r["finetune_type"], r["value"]) for t, r in fanned.items()} == {
        seen: ("seen_routing", pytest.approx(want_seen)), unseen: ("average_routing", pytest.approx(want_unseen))}


def test_evaluate_without_checkpoint_is_a_user_error(capsys):
    assert main(["evaluate", "-k", "tasks=['x']"]) == 2
    assert "checkpoint" in capsys.readouterr().err
