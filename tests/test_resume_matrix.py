"""Resume at every ZeRO stage, in fp32 and bf16: the resumed run ends where the uninterrupted one does.

For each (stage, precision) one run trains 6 steps with a checkpoint at 3 and 6. Its folder is
then copied and cut back to what a run stopped right after the step-3 checkpoint leaves behind
(Ray Train's record lists checkpoint 3 only; the later checkpoint folder and `final/` are what a
stop in between never produces and the resume removes or rewrites), and the same command resumes
the copy. Routing samples and dropout are drawn per micro batch from (seed, rank, position) and
the schedule is constant, so the two runs must end with the same adapters.

Tolerances: fp32 1e-6 (identical arithmetic; only all-reduce order could differ, and does not with
gloo on 2 ranks). bf16 keeps fp32 master weights in DeepSpeed and casts them to bf16 for every
forward pass; the resumed engine rebuilds its bf16 copies from the loaded masters, which is what
the uninterrupted engine holds too, so the same 1e-6 holds unless a cast differs: 1e-3 is allowed
there (one bf16 ulp at these magnitudes is ~4e-3 · |w|, adapters here are |w| < 0.3).

Real faults (a SIGKILLed worker, a killed driver) are in test_resume.py; test_killed_* there and
the two-stage variants below check that those resumes, too, equal an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mttl.data.synthetic import prepare_synthetic
from mttl.train.loop import pretrain
from train_support import tiny_config, train_rows

pytestmark = pytest.mark.slow

CASES = [(stage, precision) for precision in ("32", "bf16") for stage in (0, 1, 2, 3)]
TOLERANCE = {"32": 1e-6, "bf16": 1e-3}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    prepare_synthetic(out / "synthetic", seed=0)
    return out


def exact_resume_config(suite: Path, run_name: str, stage: int, precision: str):
    # constant schedule: the learning rate at a step does not depend on where a run stopped;
    # dropout on, so the per-position seeding is what makes the two runs agree
    return tiny_config(suite / "synthetic", suite / "runs", run_name, zero_stage=stage, precision=precision,
                       total_steps=6, save_every=3, eval_every=None, log_every=1, scheduler="constant",
                       warmup_steps=0, lora_dropout=0.1, module_logits_dropout=0.1)


def cut_back_to_first_checkpoint(source: Path, target: Path) -> int:
    """A copy of a finished run folder as a stop right after its first registered checkpoint left it."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "final")
    snapshot_path = target / "checkpoint_manager_snapshot.json"
    snapshot = json.loads(snapshot_path.read_text())
    first = min(snapshot["checkpoint_results"], key=lambda r: r["metrics"]["step"])
    snapshot["checkpoint_results"] = [first]
    snapshot["checkpoint_report_indices"] = snapshot["checkpoint_report_indices"][:1]
    snapshot["latest_checkpoint_result"] = first
    snapshot["current_report_index"] = 1
    snapshot_path.write_text(json.dumps(snapshot))
    config = json.loads((target / "config.json").read_text())
    config["run_name"] = target.name
    (target / "config.json").write_text(json.dumps(config))
    return first["metrics"]["step"]


def adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "adapters.safetensors"))


@pytest.mark.parametrize("stage, precision", CASES, ids=[f"zero{s}-{p}" for s, p in CASES])
def test_resumed_run_ends_with_the_uninterrupted_adapters(suite, ray_cluster, stage, precision):
    name = f"z{stage}_{precision}"
    whole = pretrain(exact_resume_config(suite, name, stage, precision))
    stopped_at = cut_back_to_first_checkpoint(whole, suite / "runs" / f"{name}_resumed")
    assert stopped_at == 3
    later_folders = [p.name for p in (suite / "runs" / f"{name}_resumed").glob("checkpoint_*")]
    assert len(later_folders) == 2  # checkpoint 3 and the unregistered later one

    resumed = pretrain(exact_resume_config(suite, f"{name}_resumed", stage, precision))
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 3, "resumed_from_step": 3} in rows
    # the unregistered later checkpoint was removed, then the resumed run wrote its own
    assert len(list(resumed.glob("checkpoint_*"))) == 2
    expected, got = adapters(whole), adapters(resumed)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert torch.allclose(got[key].float(), expected[key].float(), rtol=0, atol=TOLERANCE[precision]), key
    # steps 4-6 of the resumed run repeat the uninterrupted run's losses
    whole_losses = {r["step"]: r["loss"] for r in train_rows(whole)}
    for row in train_rows(resumed)[3:]:
        assert row["loss"] == pytest.approx(whole_losses[row["step"]], abs=TOLERANCE[precision] * 10)
