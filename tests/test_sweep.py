"""Sweeps: Ray Tune + Optuna (TPE) + ASHA on T0 CB, the preset grid, and a killed sweep resumed."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mttl.cli import main
from test_finetune import make_checkpoint, t0_cb_subset

REPO = Path(__file__).resolve().parent.parent
# Full fine-tuning from 1e-4 (barely moves) to 1.0 (wrecks the model): trials differ enough for ASHA.
WIDE_SPACE = '''
FINETUNE_TYPE = "F"
GRID = [{"learning_rate": 1e-4}, {"learning_rate": 0.3}]


def space(trial):
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1.0, log=True)}
'''
# no start race where a test's subject is not the race (each race phase is one more Tune experiment);
# the race and the killed-driver resume turn it back on
FAST = ["tasks=['cb']", "seeds=[42]", "total_steps=4", "train_batch_size=4", "eval_every_epochs=1",
        "predict_batch_size=8", "tensorboard=False", "max_input_length=96", "mc_loss=1", "unlikely_loss=1",
        "length_norm=1", "max_concurrent_trials=1", "start_race_validations=0"]


@pytest.fixture(scope="module")
def cb_run(tmp_path_factory):
    """T0 CB with an 8-row few-shot split (2 steps per epoch) and a tiny routed checkpoint."""
    root = tmp_path_factory.mktemp("sweep")
    data = t0_cb_subset(root, n_fewshot=8)
    space = root / "wide_space.py"
    space.write_text(WIDE_SPACE)
    return make_checkpoint(root, data, "poly", dataset="t0"), space


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_optuna_asha_sweep_stops_poor_trials(ray_cluster, tmp_path, cb_run):
    checkpoint, space = cb_run
    assert main(["sweep", "-k", f"checkpoint={checkpoint}", f"tune_space={space}", "num_samples=4",
                 f"output_dir={tmp_path}", "run_name=sw", *FAST]) == 0
    sweep = tmp_path / "sw"
    rows = _rows(sweep / "results.csv")
    assert len(rows) == 4 and {r["study"] for r in rows} == {"cb"}
    statuses = [r["status"] for r in rows]
    assert "stopped" in statuses and "complete" in statuses
    assert all(1e-4 <= float(r["hp/learning_rate"]) <= 1.0 for r in rows)
    assert len({r["hp/learning_rate"] for r in rows}) == 4
    best = json.loads((sweep / "cb" / "best.json").read_text())
    complete = [r for r in rows if r["status"] == "complete"]
    assert best["trial_id"] in {r["trial_id"] for r in complete}
    assert best["mean"] == pytest.approx(max(float(r["mean"]) for r in complete))
    for r in complete:  # the seed mean of one seed is that seed's best validation score
        assert float(r["mean"]) == pytest.approx(float(r["val/cb/42"]))
    # 8 few-shot rows in batches of 4 = 2 steps per epoch, one validation per epoch, 4 steps in all
    assert all(int(r["trial_steps"]) == 2 * int(r["validations"]) for r in rows)
    assert {int(r["trial_steps"]) for r in complete} == {4}
    assert json.loads((sweep / "config.json").read_text())["finetune_type"] == "F"  # from the space file
    assert "| cb | 4 |" in (sweep / "summary.md").read_text()
    _assert_asha_stopped_on_validation_loss(sweep / "cb")


def test_race_phases_drop_the_worst_third_and_double_the_laps():
    from mttl.sweep import race_phases

    assert race_phases(2, 1) == [(1, 1)]
    assert race_phases(4, 1) == [(1, 3), (2, 2), (4, 1)]  # the reference's 2 x 2 grids
    assert race_phases(3, 2) == [(2, 2), (4, 1)]
    assert race_phases(8, 1) == [(1, 5), (2, 3), (4, 2), (8, 1)]


def test_the_grid_race_puts_the_best_point_first(ray_cluster, tmp_path, cb_run):
    """Three preset points race: all run one validation, the one with the highest validation loss drops
    out, the other two continue from their laps to a second validation and are ranked on the score (ties
    on the loss). The search's first trial is the race's winner, whatever the preset's order, and it
    continues from its lap to exactly the scores its point gets alone."""
    checkpoint, _ = cb_run
    grid = '[{"learning_rate": 1e-4}, {"learning_rate": 0.3}]'
    space = tmp_path / "raced.py"  # the wide space with three points, the wrecking one first
    space.write_text(WIDE_SPACE.replace(grid, '[{"learning_rate": 0.3}, {"learning_rate": 1e-4}, '
                                              '{"learning_rate": 0.003}]'))
    assert main(["sweep", "-k", f"checkpoint={checkpoint}", f"tune_space={space}", "num_samples=4",
                 f"output_dir={tmp_path}", "run_name=race", *FAST, "start_race_validations=1"]) == 0
    study = tmp_path / "race" / "cb"
    race = json.loads((study / "start_race.json").read_text())
    assert race["metric"] == "val_loss" and race["validations"] == 1 and race["phases"] == [1, 2]
    # each phase's laps, by learning rate: one validation is one epoch of 8 rows in batches of 4 = 2 steps
    phases = {}
    for number in (1, 2):
        for result in (study / "start_race" / f"phase{number}").glob("*/result.json"):
            reports = [json.loads(line) for line in result.read_text().splitlines()]
            lr = json.loads((result.parent / "params.json").read_text())["grid_point"]["learning_rate"]
            phases.setdefault(number, {})[lr] = reports
    assert sorted(phases[1]) == [1e-4, 0.003, 0.3] and len(phases[2]) == 2
    first = {lr: reports[0]["val_loss_now"] for lr, reports in phases[1].items()}
    # the highest loss after the first lap dropped out
    assert set(phases[2]) == set(sorted(first, key=first.get)[:2])
    for lr, reports in phases[2].items():
        # continued from its phase-1 lap: that validation reported again as it was, its 2 steps taken over
        assert (reports[0]["validation"], reports[0]["trial_steps"], reports[0]["race_steps"]) == (1, 2, 2)
        assert reports[0]["val_loss_now"] == phases[1][lr][0]["val_loss_now"]
        assert reports[-1]["trial_steps"] == 4 and reports[-1]["validation"] == 2
    # the final pair on the score after the second lap, ties on the loss; the dropped point last
    final = {lr: (-reports[-1]["objective"], reports[-1]["val_loss"]) for lr, reports in phases[2].items()}
    ranked = [lap["point"]["learning_rate"] for lap in race["ranked"]]
    assert ranked[:2] == sorted(final, key=final.get) and ranked[2] not in phases[2]
    assert [lap["validations"] for lap in race["ranked"]] == [2, 2, 1]
    assert [lap["trial_steps"] for lap in race["ranked"]] == [4, 4, 2]
    for lap in race["ranked"]:  # each point's last lap kept, the one before it removed
        assert lap["checkpoint"].startswith(f"start_race/phase{1 if lap['validations'] == 1 else 2}/")
        assert (study / lap["checkpoint"]).is_dir()
    assert len(list((study / "start_race" / "phase1").glob("*/checkpoint_*"))) == 1
    # the study itself: the raced points first, best first, each continuing from its last lap
    trials = []
    for result in study.glob("*/result.json"):
        reports = [json.loads(line) for line in result.read_text().splitlines()]
        trials.append((reports[0]["timestamp"] - reports[0]["time_total_s"],
                       json.loads((result.parent / "params.json").read_text())["learning_rate"], reports))
    trials.sort(key=lambda t: t[0])
    assert [t[1] for t in trials[:3]] == ranked
    assert len(_rows(tmp_path / "race" / "results.csv")) == 4  # the race's laps are not trials of the study
    assert trials[0][2][-1].get("complete") and trials[0][2][-1]["race_steps"] == 4
    assert trials[0][2][0]["val_loss_now"] == phases[1][ranked[0]][0]["val_loss_now"]
    # the winner's scores are those its point gets in a sweep without a race
    alone = tmp_path / "winner.py"
    alone.write_text(WIDE_SPACE.replace(grid, f'[{{"learning_rate": {ranked[0]!r}}}]'))
    assert main(["sweep", "-k", f"checkpoint={checkpoint}", f"tune_space={alone}", "num_samples=1",
                 f"output_dir={tmp_path}", "run_name=alone", *FAST]) == 0
    [plain] = [json.loads(line) for line in next((tmp_path / "alone" / "cb").glob("*/result.json")).read_text()
               .splitlines()][-1:]
    assert not (tmp_path / "alone" / "cb" / "start_race.json").exists() and plain["race_steps"] == 0
    for key in ("objective", "val_loss", "test_mean", "trial_steps"):
        assert trials[0][2][-1][key] == plain[key], key


def _assert_asha_stopped_on_validation_loss(study: Path) -> None:
    """asha_metric=loss (the default): every report carries the lowest validation loss so far, and a
    stopped trial's loss at its last validation was above one that an earlier trial had at the same
    validation (sequential ASHA keeps a trial only when it ranks in the top 1/reduction_factor)."""
    import math

    trials = []
    for result in study.glob("*/result.json"):
        reports = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        trials.append(reports)
    trials.sort(key=lambda reports: reports[0]["timestamp"] - reports[0]["time_total_s"])
    for i, reports in enumerate(trials):
        losses = [r["val_loss"] for r in reports]
        assert all(math.isfinite(v) and v > 0 for v in losses)
        assert losses == sorted(losses, reverse=True)  # a running minimum
        if not reports[-1].get("complete"):
            at = reports[-1]["validation"]
            earlier = [r["val_loss"] for other in trials[:i] for r in other if r["validation"] == at]
            assert earlier and min(earlier) < reports[-1]["val_loss"], (at, earlier, reports[-1]["val_loss"])


def test_grid_search_runs_the_reference_preset(ray_cluster, tmp_path, cb_run):
    checkpoint, _ = cb_run
    assert main(["sweep", "-k", f"checkpoint={checkpoint}", "tune_space=mhr_z", "search=grid",
                 f"output_dir={tmp_path}", "run_name=grid", *FAST, "total_steps=2", "study_per_task=False"]) == 0
    rows = _rows(tmp_path / "grid" / "results.csv")
    assert {r["study"] for r in rows} == {"all_tasks"}  # one study over every task
    assert json.loads((tmp_path / "grid" / "all_tasks" / "best.json").read_text())["tasks"] == ["cb"]
    assert sorted(float(r["hp/module_logits_learning_rate"]) for r in rows) == [0.1, 0.5]
    assert all(r["status"] == "complete" for r in rows)
    assert json.loads((tmp_path / "grid" / "config.json").read_text())["finetune_type"] == "Z"
    # each trial's folder keeps its own curves: every validation Tune got is in its metrics.jsonl
    trial_results = list((tmp_path / "grid" / "all_tasks").glob("*/result.json"))
    assert len(trial_results) == 2
    for result in trial_results:
        reported = [json.loads(line) for line in result.read_text().splitlines()]
        logged = [json.loads(line) for line in (result.parent / "metrics.jsonl").read_text().splitlines()]
        validations = [[v for k, v in row.items() if k.startswith("val/")] for row in logged]
        assert [r["val_value"] for r in reported if not r.get("complete")] == [v[0] for v in validations if v]


def _state_has_terminated_trial(study: Path) -> bool:
    return any("TERMINATED" in p.read_text() for p in study.glob("experiment_state-*.json"))


def _complete_trial_reports(study: Path) -> dict[str, int]:
    """trial dir -> number of reports, for trials whose last report marks them complete."""
    out = {}
    for result in study.glob("*/result.json"):
        lines = result.read_text().splitlines()
        if lines and json.loads(lines[-1]).get("complete"):
            out[result.parent.name] = len(lines)
    return out


@pytest.mark.slow
def test_killed_sweep_driver_resumes_keeping_finished_trials(tmp_path, cb_run):
    checkpoint, space = cb_run
    command = [sys.executable, str(REPO / "jobs" / "sweep.py"), "-k", f"checkpoint={checkpoint}",
               f"tune_space={space}", "num_samples=2", f"output_dir={tmp_path}", "run_name=resume",
               "asha_grace_period=100", *FAST, "start_race_validations=1"]
    # checkpoint the experiment state after every step so the kill lands after a saved finished trial
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    study = tmp_path / "resume" / "cb"
    driver = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600  # a hang guard: two test processes share the 2 cores
        # Tune writes the experiment state before the searcher's, so wait for the searcher's file to
        # know the finished trial too, not only for the state to say TERMINATED
        while not (_complete_trial_reports(study) and _state_has_terminated_trial(study)
                   and _searcher_knows(study, space)):
            assert driver.poll() is None, "the sweep ended before it could be killed"
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        driver.wait()
    finished_before = _complete_trial_reports(study)
    assert not (tmp_path / "resume" / "results.csv").exists()
    # the searcher Tune saved before the kill loads and knows the finished trials with their scores
    assert _searcher_trials(study, space) >= _finished_trials(study, finished_before)

    rerun = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = _rows(tmp_path / "resume" / "results.csv")
    assert len(rows) == 2 and all(r["status"] == "complete" for r in rows)
    after = _complete_trial_reports(study)
    for trial, reports in finished_before.items():
        assert after[trial] == reports  # kept as it was, not run again
    searched = _searcher_trials(study, space)
    assert searched >= _finished_trials(study, after) and len(searched) == 2  # the restored study went on


def _searcher_knows(study: Path, space: Path) -> bool:
    """Whether the searcher state saved in `study` holds every finished trial (False while half-written)."""
    finished = _finished_trials(study, _complete_trial_reports(study))
    try:
        return bool(finished) and _searcher_trials(study, space) >= finished
    except Exception:  # the pickle is being written, or not written yet
        return False


def _finished_trials(study: Path, trials) -> set[tuple[float, float]]:
    """(learning rate, final objective) of the given trial folders, read from Tune's files."""
    out = set()
    for trial in trials:
        last = json.loads((study / trial / "result.json").read_text().splitlines()[-1])
        out.add((json.loads((study / trial / "params.json").read_text())["learning_rate"], last["objective"]))
    return out


def _searcher_trials(study: Path, space: Path) -> set[tuple[float, float]]:
    """(learning rate, value) of the completed trials in the Optuna study Tune saved into `study`."""
    import optuna

    searcher = _searcher(str(space))
    searcher.restore_from_dir(str(study))
    return {(t.params["learning_rate"], t.value) for t in searcher._ot_study.trials
            if t.state == optuna.trial.TrialState.COMPLETE}


def test_sweep_base_follows_the_checkpoint_and_the_space(cb_run, monkeypatch):
    from mttl.config import Config
    from mttl.finetune.loop import default_seeds, eval_every_epochs
    from mttl.sweep import sweep_base_config

    checkpoint, space = cb_run
    monkeypatch.chdir(checkpoint.parent)
    base, module, name = sweep_base_config(Config().update({"checkpoint": checkpoint.name, "tune_space": "mhr_z"}))
    assert base.dataset == "t0" and default_seeds(base) == [42, 1024, 0] and eval_every_epochs(base) == 50
    assert base.checkpoint == str(checkpoint) and base.finetune_type == "Z" and name == "mhr_z"
    base, _, name = sweep_base_config(Config().update({"checkpoint": str(checkpoint), "tune_space": space.name,
                                                       "finetune_type": "Poly"}))
    assert name == str(space) and base.finetune_type == "Poly"  # the user's choice wins over the space's


def _searcher(space: str):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from mttl.sweep import OBJECTIVE, DefineBySpace

    return OptunaSearch(space=DefineBySpace(space), metric=OBJECTIVE, mode="max",
                        sampler=optuna.samplers.TPESampler(seed=0, multivariate=True))


def test_searcher_state_survives_save_and_restore(tmp_path, cb_run):
    """Tune pickles the searcher (with its define-by-run space) into the study folder; a restored
    searcher holds the finished trials and keeps suggesting inside the space."""
    from mttl.sweep import OBJECTIVE

    _, space = cb_run
    searcher = _searcher(str(space))
    told = {}
    for i in range(3):
        config = searcher.suggest(f"t{i}")
        assert set(config) == {"learning_rate"}
        told[config["learning_rate"]] = float(i)
        searcher.on_trial_complete(f"t{i}", {OBJECTIVE: float(i)})
    searcher.save(str(tmp_path / "searcher.pkl"))

    restored = _searcher(str(space))
    restored.restore(str(tmp_path / "searcher.pkl"))
    finished = {t.params["learning_rate"]: t.value for t in restored._ot_study.trials}
    assert finished == told
    config = restored.suggest("t3")
    assert 1e-4 <= config["learning_rate"] <= 1.0 and config["learning_rate"] not in told
    assert len(restored._ot_study.trials) == 4


@pytest.mark.parametrize("num_samples,random", [(4, 2), (8, 2), (12, 4), (30, 10), (100, 10)])
def test_tpe_models_the_scores_after_a_third_of_the_trials(num_samples, random):
    from mttl.config import Config
    from mttl.sweep import random_trials

    assert random_trials(Config().update({"num_samples": num_samples})) == random
