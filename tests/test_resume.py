"""Resume: continuing a finished run to a larger total, refusing a changed config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mttl.cli import main
from mttl.train.loop import pretrain
from train_support import TASKS, tiny_config, train_rows

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def suite(tmp_path_factory, default_synthetic):
    out = tmp_path_factory.mktemp("suite")
    (out / "synthetic").symlink_to(default_synthetic)
    return out


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    steps = []
    for state in run_dir.glob("checkpoint_*/trainer_state.json"):
        try:
            steps.append(json.loads(state.read_text())["step"])
        except (json.JSONDecodeError, OSError):  # being written
            continue
    return sorted(steps)


def test_finished_run_continues_to_a_larger_total(suite, ray_cluster):
    cfg = tiny_config(suite / "synthetic", suite / "runs", "grow", num_workers=1, total_steps=6, save_every=3,
                      eval_every=None)
    run_dir = pretrain(cfg)
    assert _checkpoint_steps(run_dir)[-1] == 6
    # checkpoints carry the trained tensors and DeepSpeed state, never the frozen backbone
    for path in run_dir.glob("checkpoint_*/deepspeed/**/*.pt"):
        module = torch.load(path, map_location="cpu", weights_only=True).get("module") or {}
        assert module and all("lora_" in k or "module_logits" in k for k in module), sorted(module)[:3]

    pretrain(cfg.copy(total_steps=10))
    rows = _rows(run_dir)
    assert {"step": 6, "resumed_from_step": 6} in rows
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, 11))
    assert _checkpoint_steps(run_dir)[-1] == 10
    # the warm-up fixed at the start (3 steps) stays; the decay now ends at the new total
    peak = cfg.adapters_learning_rate
    for row in train_rows(run_dir)[6:]:
        assert row["lr/adapters"] == pytest.approx(peak * (10 - row["step"]) / (10 - 3))


def test_changed_config_is_refused_naming_the_keys(suite, capsys):
    cfg = tiny_config(suite / "synthetic", suite / "runs", "refuse", total_steps=4, n_tasks=len(TASKS))
    run_dir = Path(cfg.output_dir) / cfg.run_name
    cfg.save(run_dir)
    (run_dir / "tasks.json").write_text(json.dumps({name: row for row, name in enumerate(TASKS)}))
    config_file = run_dir.parent / "refuse.json"
    config_file.write_text(json.dumps(cfg.to_dict()))
    code = main(["pretrain", "-c", str(config_file), "-k", "learning_rate=0.5", "lora_rank=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "learning_rate" in err and "lora_rank" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# A SIGKILLed worker and a killed driver: test_resume_matrix.py, checked against an uninterrupted run.
