"""A few pre-training steps on real Super-NaturalInstructions tasks with the real T5 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import shared_path
from mttl.data.ni import prepare_ni
from mttl.train.loop import pretrain
from train_support import tiny_config, train_rows

pytestmark = pytest.mark.slow


def _mini_checkout(source: Path, folder: Path, n_train: int = 3) -> list[str]:
    """A natural-instructions layout holding the first few training tasks of the default split."""
    train = [n.strip() for n in (source / "splits" / "default" / "train_tasks.txt").read_text().splitlines()
             if n.strip() and (source / "tasks" / f"{n.strip()}.json").is_file()][:n_train]
    test = [n.strip() for n in (source / "splits" / "default" / "test_tasks.txt").read_text().splitlines()
            if n.strip() and (source / "tasks" / f"{n.strip()}.json").is_file()][:1]
    (folder / "tasks").mkdir(parents=True)
    (folder / "splits" / "mini").mkdir(parents=True)
    for name in train + test:
        (folder / "tasks" / f"{name}.json").symlink_to(source / "tasks" / f"{name}.json")
    (folder / "splits" / "mini" / "train_tasks.txt").write_text("\n".join(train) + "\n")
    (folder / "splits" / "mini" / "test_tasks.txt").write_text("\n".join(test) + "\n")
    return train


def test_few_steps_on_prepared_ni_with_the_t5_tokenizer(tmp_path, t5_tokenizer_path, ray_cluster):
    source = shared_path("data", "natural-instructions")
    train = _mini_checkout(source, tmp_path / "ni-source")
    prepare_ni(tmp_path / "ni-source", tmp_path / "ni", split="mini", max_instances_per_task=40,
               validation_per_task=8, test_instances=10)
    cfg = tiny_config(tmp_path / "ni", tmp_path / "runs", "ni", tasks=None, dataset="ni",
                      tokenizer=str(t5_tokenizer_path), max_input_length=64, max_output_length=16,
                      total_steps=4, save_every=4, eval_every=4, log_every=1, num_workers=1)
    run_dir = pretrain(cfg)
    assert sorted(json.loads((run_dir / "tasks.json").read_text())) == sorted(train)
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4]
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert set(evals[-1]) >= {f"val_loss/{name}" for name in train}
    assert (run_dir / "final" / "adapters.safetensors").is_file()
