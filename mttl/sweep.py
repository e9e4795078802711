"""Hyper-parameter search of few-shot fine-tuning with Ray Tune, Optuna (TPE) and ASHA.

Owns `mttl sweep`: the search space comes from a `tune_spaces/` module (or a .py file); each
trial fine-tunes one held-out task with every configured seed, reporting after each validation
so ASHA can stop poor trials early (on the validation loss, which moves from the first steps,
by default), and ends with the seed mean of the best validation scores, which TPE models. TPE
starts from the space's preset grid (`search_starts_from_grid`), whose points first race side by
side in laps from `start_race_validations`, the worst dropped after each (`race_start_points`), and
then run best first, each continuing
from its lap (`start_race_continue`: the lap's state is the race trial's checkpoint), so the race
costs no step twice; a space's `steps_fraction` is turned into total_steps here (`config_overrides`).
One Tune experiment (= study) per task under `$output_dir/$run_name/<task>/` (or one for all
tasks with `study_per_task=False`); running the same `run_name` again restores it (finished
trials kept, searcher state kept, unfinished trials run again), once `mttl.sweep_state` has
found every pickled state file signed by this user's mttl. Results: `results.csv` (one row
per trial), `best.json` (per task), `summary.md` and a printed table. With an output_dir URI the sweep
folder is a local mirror under cache_dir, pulled from the bucket first and pushed back after each
study and when the sweep stops (trial folders of trials that ran on other nodes stay on those
nodes, as with a local output_dir; their rows reach results.csv through Tune). A trial computes on a GPU
when Ray assigns it one (`trial_resources`; by default one GPU per trial when `use_gpu` finds GPUs
in the cluster), under `precision` (`mttl.device`). `max_concurrent_trials` defaults to the trials
the cluster's resources hold at once; one line per finished trial (`mttl.progress`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import pkgutil
from functools import partial
from pathlib import Path
from types import ModuleType

from dataclasses import fields

from mttl import console, storage
from mttl.config import Config
from mttl.errors import ConfigError, MttlError
from mttl.finetune.type_table import finetune_type

SPACES_PACKAGE = "tune_spaces"


# ------------------------------------------------------------------------------ search spaces
def available_spaces() -> list[str]:
    package = importlib.import_module(SPACES_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def load_space(name_or_path: str) -> ModuleType:
    """A `tune_spaces` module by name, or any .py file by path; it must define `space` and `GRID`."""
    if name_or_path.endswith(".py"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"tune_space file '{path}' does not exist; "
                              f"give a .py file or one of {available_spaces()}")
        spec = importlib.util.spec_from_file_location(f"tune_space_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    elif name_or_path in available_spaces():
        module = importlib.import_module(f"{SPACES_PACKAGE}.{name_or_path}")
    else:
        raise ConfigError(f"tune_space '{name_or_path}' is neither a .py file nor one of {available_spaces()}; "
                          f"example: -k tune_space=mhr_z")
    if not callable(getattr(module, "space", None)) or not isinstance(getattr(module, "GRID", None), list):
        raise ConfigError(f"tune_space '{name_or_path}' must define space(trial) -> dict and GRID: list[dict]; "
                          f"see tune_spaces/__init__.py")
    return module


def default_space_name(cfg: Config) -> str:
    """The space the finetune type's table row names for the model: Z → *_z, MuZ → mhr_mu, F → full, …"""
    return finetune_type(cfg.finetune_type).default_space(cfg.model_modifier, cfg.n_splits)


# ------------------------------------------------------------------------------------ trials
OBJECTIVE = "objective"  # running mean of the best validation scores (final: the seed mean)
VAL_LOSS = "val_loss"  # running mean of the lowest validation losses: ASHA's signal with asha_metric=loss
TIME_ATTR = "validation"  # ASHA's clock: validations done so far in the trial
GRID_KEY = "grid_point"  # search=grid: the trial's preset point, a dict of config overrides
TRIAL_STEPS = "trial_steps"  # optimizer steps the trial has run so far, over all its tasks and seeds


STEPS_FRACTION = "steps_fraction"  # a space's key: this share of the configured steps (the most a trial runs)


def trial_overrides(config: dict) -> dict:
    return config.get(GRID_KEY, config)


def config_overrides(config: dict, base: Config) -> dict:
    """The trial's config keys: `steps_fraction` becomes total_steps (or num_train_epochs) scaled from `base`'s."""
    from mttl.finetune.loop import DEFAULT_STEPS

    overrides = dict(trial_overrides(config))
    fraction = overrides.pop(STEPS_FRACTION, None)
    if fraction is not None:
        if base.total_steps <= 0 and base.num_train_epochs > 0:
            overrides["num_train_epochs"] = max(1, round(fraction * base.num_train_epochs))
        else:
            overrides["total_steps"] = max(1, round(fraction * (base.total_steps if base.total_steps > 0
                                                                 else DEFAULT_STEPS)))
    return overrides


def _trial(config: dict, base: Config, tasks: list[str], race_validations: int = 0,
           study_dir: str | None = None, race_laps: dict[str, str] | None = None) -> None:
    """One trial: fine-tune `tasks` × seeds with the trial's hyper-parameters, reporting each validation.

    With `race_validations` (a start race's lap, `race_start_points`) each task × seed stops after that
    many validations, nothing is tested, and the laps' states are the trial's checkpoint. A trial of
    a point that raced in `study_dir` continues from its lap (`start_race_continue`) where this node
    can read the race's checkpoint, else it starts over; so does a race trial of a later phase from the
    point's lap in the phase before (`race_laps`: point → its checkpoint folder)."""
    from statistics import fmean

    from ray import tune

    from mttl.tracking import MetricsLogger

    cfg = base.copy(**config_overrides(config, base))
    if race_validations:
        folder = (race_laps or {}).get(_point_key(trial_overrides(config)))
        resume = load_lap_folder(Path(folder)) if folder and base.start_race_continue else {}
    else:
        resume = lap_states(Path(study_dir), base, cfg) if study_dir else {}
    cfg.do_zs = False  # the reference's search skips zero-shot scoring too
    best_val: dict[str, float] = {}
    best_loss: dict[str, float] = {}
    test: dict[str, float] = {}
    clock = {"validation": 0, "steps_before_seed": 0, "steps": 0, "race_steps": 0}
    laps: dict[str, dict] = {}
    context = tune.get_context()
    # the trial's own curves (metrics.jsonl, TensorBoard, MLflow / W&B when configured) in its folder
    logger = MetricsLogger(Path(context.get_trial_dir()), cfg,
                           name=f"{base.run_name or 'sweep'}/{context.get_trial_name()}")
    with logger:
        _run_trial_seeds(cfg, tasks, best_val, best_loss, test, clock, logger.log, stop_after=race_validations,
                         laps=laps if race_validations and cfg.start_race_continue else None, resume=resume)
    metrics = {OBJECTIVE: fmean(best_val.values()), VAL_LOSS: fmean(best_loss.values()),
               TIME_ATTR: clock["validation"], TRIAL_STEPS: clock["steps"], RACE_STEPS: clock["race_steps"],
               "complete": True,
               **({"test_mean": fmean(test.values())} if test else {}), **{f"val/{k}": v for k, v in best_val.items()},
               **{f"test/{k}": v for k, v in test.items()}}
    if not laps:
        tune.report(metrics)
        return
    import tempfile

    import torch

    with tempfile.TemporaryDirectory(prefix="mttl-lap-") as folder:
        for key, state in laps.items():
            torch.save(state, Path(folder) / f"{lap_name(key)}.pt")
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


RACE_STEPS = "race_steps"  # of TRIAL_STEPS, those a trial took over from its start race lap (not run again)


def lap_name(key: str) -> str:
    """The file stem of a task/seed's lap state in a race checkpoint (`lap_states` keys them by it)."""
    from mttl.run_folder import safe_name

    return safe_name(key.replace("/", "__"))


def lap_states(study_dir: Path, base: Config, cfg: Config) -> dict[str, dict]:
    """The start race's lap states of the point whose configuration is `cfg`, by task/seed: {} when no
    raced point gives the same configuration, or its checkpoint is not on this node (the trial then
    starts over, as without the race)."""
    import json

    import torch

    if not cfg.start_race_continue or not (study_dir / RACE_ORDER).is_file():
        return {}
    for lap in json.loads((study_dir / RACE_ORDER).read_text()).get("ranked", []):
        folder = study_dir / lap["checkpoint"] if lap.get("checkpoint") else None
        # the same configuration, not the same dict: a space's constants or a key left at its default
        if folder is not None and folder.is_dir() and not cfg.diff(base.copy(**config_overrides(lap["point"], base))):
            return load_lap_folder(folder)
    return {}


def load_lap_folder(folder: Path) -> dict[str, dict]:
    """A race checkpoint's lap states by task/seed file stem ({} when the folder is not on this node)."""
    import torch

    if not folder.is_dir():
        return {}
    # tensors and plain values only (`finetune_seed`'s lap state): nothing pickled is run
    return {file.stem: torch.load(file, map_location="cpu", weights_only=True) for file in sorted(folder.glob("*.pt"))}


def _point_key(point: dict) -> str:
    import json

    return json.dumps(point, sort_keys=True)


def _run_trial_seeds(cfg: Config, tasks: list[str], best_val: dict, best_loss: dict, test: dict, clock: dict,
                     log, stop_after: int = 0, laps: dict | None = None, resume: dict | None = None) -> None:
    """Every task × seed of one trial, each validation reported to Tune (ASHA decides on it); with
    `stop_after`, each task × seed ends after that many validations (its best so far kept, its state
    put in `laps`); a task × seed with a state in `resume` continues from it."""
    from statistics import fmean

    from ray import tune

    from mttl.finetune.loop import default_seeds, finetune_seed

    for task in tasks:
        for seed in default_seeds(cfg):
            key = f"{task}/{seed}"
            running = {"best": float("-inf"), "loss": float("inf")}
            state = (resume or {}).get(lap_name(key))
            if state is not None:
                clock["race_steps"] += state["step"]

            def report(row: dict) -> None:
                clock["validation"] += 1
                clock["steps"] = clock["steps_before_seed"] + row["step"]
                running["best"] = max(running["best"], row["value"])
                running["loss"] = min(running["loss"], row["loss"])
                best_loss[key] = running["loss"]
                tune.report({OBJECTIVE: fmean([*best_val.values(), running["best"]]),
                             VAL_LOSS: fmean(best_loss.values()), TIME_ATTR: clock["validation"],
                             TRIAL_STEPS: clock["steps"], RACE_STEPS: clock["race_steps"], "task": task,
                             "seed": seed, "val_value": row["value"], "val_loss_now": row["loss"]})

            rows = finetune_seed(cfg, task, seed, on_validation=report, log=log, stop_after_validations=stop_after,
                                 on_lap=None if laps is None else partial(laps.__setitem__, key), resume=state)
            for row in rows:
                if row["evaluation"] == "best_val":
                    best_val[key] = row["value"]
                    clock["steps"] = clock["steps_before_seed"] + row["trained_steps"]  # past the last validation
                elif row["evaluation"] == "test":
                    test[key] = row["value"]
            clock["steps_before_seed"] = clock["steps"]


# ------------------------------------------------------------------------------------ driver
def checkpoint_config_for(cfg: Config) -> Config:
    """`cfg` with the checkpoint's architecture and data keys (see `mttl.finetune.types`)."""
    from mttl.finetune.types import inherit_checkpoint_config
    from mttl.models.run import resolve_run_dir

    if not cfg.checkpoint:
        raise ConfigError("a sweep fine-tunes a pre-trained run: -k checkpoint=$output_dir/$run_name")
    return inherit_checkpoint_config(Config.load(resolve_run_dir(cfg.checkpoint_path()) / "config.json"), cfg)


def sweep_base_config(cfg: Config) -> tuple[Config, ModuleType, str]:
    """The config every trial starts from, the space, its name.

    The base is `cfg` with the checkpoint's architecture and data keys (so seeds and validation
    defaults follow the checkpoint's dataset), absolute paths, and the space's finetune type and
    defaults where the user set none.
    """
    base = with_absolute_paths(checkpoint_config_for(cfg))
    name = cfg.tune_space or default_space_name(base)
    if name.endswith(".py"):  # trials and a resumed searcher load it again, maybe from another folder
        name = str(Path(name).expanduser().resolve())
    module = load_space(name)
    fixed = dict(getattr(module, "DEFAULTS", {}))
    if hasattr(module, "FINETUNE_TYPE"):
        fixed["finetune_type"] = module.FINETUNE_TYPE
    for key, value in fixed.items():
        if not cfg.was_overridden(key):
            setattr(base, key, value)
    return base, module, name


def with_absolute_paths(cfg: Config) -> Config:
    """A copy whose local path keys are absolute: trials run in their own working folders."""
    out = cfg.copy()
    for f in fields(Config):
        value = getattr(cfg, f.name)
        if f.metadata.get("path") and isinstance(value, str) and Path(value).exists():
            setattr(out, f.name, str(Path(value).resolve()))
    return out


class DefineBySpace:
    """Optuna define-by-run function of a space; picklable (Tune saves the searcher with it)."""

    def __init__(self, space_name: str):
        self.space_name = space_name

    def __call__(self, trial) -> dict | None:
        values = load_space(self.space_name).space(trial)
        # suggested values are already the trial's parameters; only fixed keys go back as constants
        return {k: v for k, v in values.items() if k not in trial.params} or None


def random_trials(cfg: Config) -> int:
    """Trials TPE samples at random before it models the scores."""
    return min(10, max(2, cfg.num_samples // 3))


def _optuna_search(cfg: Config, space_name: str, starts: list[dict] | None = None):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # Optuna samples its first 10 trials at random; a sweep of num_samples=8 would never use TPE,
    # so a third of the trials (at least 2) explore at random and the rest follow the model.
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, n_startup_trials=random_trials(cfg))
    return OptunaSearch(space=DefineBySpace(space_name), metric=OBJECTIVE, mode="max", sampler=sampler,
                        points_to_evaluate=(start_points(cfg, space_name) if starts is None else starts) or None)


def start_points(cfg: Config, space_name: str) -> list[dict]:
    """The trials TPE runs first with search_starts_from_grid: the space's GRID in order, at full steps.

    The reference's grid is a good prior on a few-shot task; started from it (raced into best-first
    order by `race_start_points`), the search costs the race, the grid's best point and what ASHA
    lets the others run, and TPE models around scores it trusts."""
    import optuna

    if not cfg.search_starts_from_grid:
        return []
    module = load_space(space_name)
    with _optuna_quiet(cfg):
        searched = set(module.space(optuna.create_study().ask()))
    for point in module.GRID:
        if not set(point) <= searched:
            raise ConfigError(f"tune_space '{space_name}': GRID key(s) {sorted(set(point) - searched)} are not "
                              "searched by space(trial), so a search started from the grid would drop them; add "
                              "them to space(trial) or set -k search_starts_from_grid=False")
    full = {STEPS_FRACTION: 1.0} if STEPS_FRACTION in searched else {}
    return [{**point, **full} for point in module.GRID][:cfg.num_samples]


RACE_DIR = "start_race"  # in a study's folder: the Tune experiment of its start race
RACE_ORDER = "start_race.json"  # in a study's folder: the start points best first, with what they reached


def race_phases(n_points: int, first_lap: int) -> list[tuple[int, int]]:
    """(validations at the end of the phase, points still racing after it) for each phase of a start race
    of `n_points`: laps double from `first_lap`; after each phase the worst third of the points (at least
    one) drop out, and the phase that leaves one point is decided on the score (`race_start_points`)."""
    phases, alive, lap = [], n_points, first_lap
    while alive > 1:
        alive = 1 if alive == 2 else alive - max(1, round(alive / 3))
        phases.append((lap, alive))
        lap *= 2
    return phases


def race_start_points(study_dir: Path, cfg: Config, base: Config, tasks: list[str], resources: dict,
                      points: list[dict]) -> list[dict]:
    """`points` best first after a start race of successive rejects (`race_phases`): every point runs
    `start_race_validations` validations of every task × seed side by side, the worst drop out on
    `asha_metric` (the validation loss moves from the first steps), the rest run on to twice the
    validations from where they stopped, and so on; the last two are ranked on the score (the search's
    objective; ties on the loss), which has moved by then. The order: the winner, the runner-up, then
    the others, the later dropped first.

    Why: ASHA cannot stop a study's first trial (nothing to compare it with) and compares each later
    one with those before it, so a preset whose best point comes late pays full runs for the points
    before it. Raced, the best point runs first and the rest are stopped at their first rungs. Why
    phases: after a lap or two a smaller learning rate often ties the best point on the loss and ends
    several points below it; the score separates them a few validations later, and by then only two
    points are still running (`benchmarks/README.md`). The race is a probe: its trials are not in
    results.csv; `start_race.json` keeps the ranking and each point's last lap checkpoint (relative
    to the study), from which the point's trial continues (`_trial`), and a race cut short runs again
    whole."""
    import json
    import shutil

    from ray import tune

    from mttl.ray_utils import run_in_background
    from mttl.run_folder import atomic_write_text

    first_lap = cfg.start_race_validations
    if first_lap <= 0 or len(points) < 2:
        return points
    shutil.rmtree(study_dir / RACE_DIR, ignore_errors=True)
    phases = race_phases(len(points), first_lap)
    metric, sign = (VAL_LOSS, 1.0) if cfg.asha_metric == "loss" else (OBJECTIVE, -1.0)
    position = {_point_key(p): i for i, p in enumerate(points)}
    print(f"[sweep] {study_dir.name}: racing the {len(points)} grid points over laps of "
          f"{', '.join(str(lap) for lap, _ in phases)} validation(s), the worst dropped after each",
          file=console.ours(), flush=True)
    alive, dropped, race_laps = list(points), [], {}
    for number, (lap, keep) in enumerate(phases, 1):
        trainable = tune.with_resources(tune.with_parameters(_trial, base=base, tasks=tasks, race_validations=lap,
                                                             race_laps=dict(race_laps)), resources)
        tuner = tune.Tuner(trainable, param_space={GRID_KEY: tune.grid_search(alive)},
                           tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=(
                               cfg.max_concurrent_trials or fits_at_once(resources))),
                           run_config=tune.RunConfig(name=f"phase{number}", storage_path=str(study_dir / RACE_DIR),
                                                     verbose=0))
        laps_run, superseded = [], []
        for result in run_in_background(tuner.fit):
            metrics = result.metrics or {}
            ok = bool(metrics.get("complete")) and not result.error
            lap_row = {"point": trial_overrides(result.config), "validations": lap,
                       VAL_LOSS: metrics.get(VAL_LOSS) if ok else None, OBJECTIVE: metrics.get(OBJECTIVE) if ok else None,
                       # every step the point has run in the race so far (its earlier phases' included)
                       TRIAL_STEPS: metrics.get(TRIAL_STEPS, 0)}
            saved = Path(result.checkpoint.path).resolve() if ok and result.checkpoint else None
            if saved is not None and saved.is_dir() and saved.is_relative_to(study_dir.resolve()):
                # relative: a sweep folder moved, or pulled from a bucket into another mirror, still finds it
                lap_row["checkpoint"] = saved.relative_to(study_dir.resolve()).as_posix()
                superseded.append(race_laps.get(_point_key(lap_row["point"])))
                race_laps[_point_key(lap_row["point"])] = str(saved)
            laps_run.append(lap_row)
        for folder in filter(None, superseded):  # a point's earlier lap: its new one continued from it
            shutil.rmtree(folder, ignore_errors=True)
        final = keep == 1 and len(laps_run) == 2
        # best first; a failed point last; ties keep the preset's order. The final pair on the score, ties
        # on the loss
        def order(r: dict, final: bool = final) -> tuple:
            value = (-(r[OBJECTIVE] or 0.0), r[VAL_LOSS] or 0.0) if final else (sign * (r[metric] or 0.0),)
            return (r[metric] is None, *value, position.get(_point_key(r["point"]), len(points)))

        laps_run.sort(key=order)
        dropped = laps_run[keep:] + dropped  # the later dropped ranks above the earlier
        alive = [r["point"] for r in laps_run[:keep]]
    ranked_laps = laps_run[:1] + dropped  # the last phase keeps one point: the winner
    atomic_write_text(study_dir / RACE_ORDER, json.dumps(
        {"metric": metric, "final_metric": OBJECTIVE if metric == VAL_LOSS else metric, "validations": first_lap,
         "phases": [lap for lap, _ in phases], "ranked": ranked_laps}, indent=2) + "\n")
    ranked = [r["point"] for r in ranked_laps]
    best = ranked_laps[0]
    print(f"[sweep] {study_dir.name}: the search starts from "
          + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(best["point"].items()))
          + (f" (score {best[OBJECTIVE]:.4g}, loss {best[VAL_LOSS]:.4g} after {best['validations']} validation(s))"
             if best[VAL_LOSS] is not None and best[OBJECTIVE] is not None else ""),
          file=console.ours(), flush=True)
    return ranked + [p for p in points if p not in ranked]


@contextlib.contextmanager
def _optuna_quiet(cfg: Config):
    """Optuna's INFO lines (a study created for each search) only with `verbose=True`."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    if not cfg.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def fits_at_once(resources: dict) -> int:
    """Trials of `resources` the Ray cluster can run at once (at least 1): the default of
    `max_concurrent_trials`, so the searcher does not queue more trials than can start."""
    import ray

    cluster = ray.cluster_resources()
    counts = [int(cluster.get(name, 0) // float(need) + 1e-9) for name, need in resources.items() if float(need) > 0]
    return max(1, min(counts)) if counts else 1


def _study_tuner(study_dir: Path, trainable, cfg: Config, module: ModuleType, space_name: str,
                 resources: dict | None = None, race=None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from mttl.sweep_state import TUNER_FILE, SignStateCallback, sign_files

    if tune.Tuner.can_restore(str(study_dir)):
        return _restored_tuner(study_dir, trainable, cfg, space_name)
    param_space = {}
    if cfg.search == "grid":  # every preset point once, no early stopping (as the reference)
        search, scheduler, samples = None, None, 1
        param_space = {GRID_KEY: tune.grid_search(list(module.GRID))}
    else:
        starts = start_points(cfg, space_name)
        search = _optuna_search(cfg, space_name, race(starts) if race and starts else starts)
        # ASHA ranks trials at its rungs (the first after asha_grace_period validations), TPE on the final score
        metric, mode = (VAL_LOSS, "min") if cfg.asha_metric == "loss" else (OBJECTIVE, "max")
        scheduler = ASHAScheduler(time_attr=TIME_ATTR, metric=metric, mode=mode, max_t=1_000_000,
                                  grace_period=cfg.asha_grace_period, reduction_factor=cfg.asha_reduction_factor)
        samples = cfg.num_samples
    from mttl.progress import TrialProgress

    total = len(module.GRID) if cfg.search == "grid" else samples
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=samples,
                                    max_concurrent_trials=cfg.max_concurrent_trials or fits_at_once(resources or {})),
        run_config=tune.RunConfig(name=study_dir.name, storage_path=str(study_dir.parent), verbose=0,
                                  callbacks=[SignStateCallback(), TrialProgress(study_dir.name, total)]),
    )
    sign_files(study_dir, [study_dir / TUNER_FILE])  # written by the Tuner just now; the rest is signed as saved
    return tuner


def check_saved_study(study_dir: Path, cfg: Config, space_name: str) -> None:
    """A study that will be resumed: its Tune state must be this user's (`mttl.sweep_state`) and readable.

    Run for every study before Ray starts, so a refused or damaged one stops the sweep at once."""
    from ray import tune

    from mttl.sweep_state import adopt_state, check_restorable, verify_state

    if not tune.Tuner.can_restore(str(study_dir)):
        return
    if cfg.trust_sweep_state:
        adopt_state(study_dir)
    else:
        verify_state(study_dir)
    check_restorable(study_dir, lambda: _optuna_search(cfg, space_name))


def _restored_tuner(study_dir: Path, trainable, cfg: Config, space_name: str):
    """The study as Tune saved it; `check_saved_study` has passed on it."""
    from ray import tune

    from mttl.sweep_state import SignStateCallback

    try:
        tuner = tune.Tuner.restore(str(study_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    except Exception as err:  # a signed but damaged tuner.pkl, or one from another Ray version
        text = " ".join(str(err).split())[:200] or "no details"
        raise MttlError(f"the Ray Tune study in '{study_dir}' cannot be restored ({type(err).__name__}: {text}); "
                        "move that folder away to run the study again from the start, or use a new run_name") from None
    # a study saved before its state was signed: sign what it saves from now on
    run_config = tuner._local_tuner.get_run_config() if getattr(tuner, "_local_tuner", None) else None
    if run_config is not None and not any(isinstance(c, SignStateCallback) for c in run_config.callbacks or []):
        run_config.callbacks = [*(run_config.callbacks or []), SignStateCallback()]
    from mttl.progress import TrialProgress

    if run_config is not None and not any(isinstance(c, TrialProgress) for c in run_config.callbacks or []):
        run_config.callbacks = [*(run_config.callbacks or []), TrialProgress(study_dir.name, cfg.num_samples)]
    return tuner


def _trial_rows(study: str, results, base: Config) -> list[dict]:
    """One row per trial; its hyper-parameters as config keys a `mttl finetune` run takes."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        error = str(result.error).strip().splitlines()[-1] if result.error else ""
        row = {"study": study, "trial_id": metrics.get("trial_id") or Path(result.path).name,
               "status": "complete" if metrics.get("complete") else ("error" if result.error else "stopped"),
               **{f"hp/{k}": v for k, v in sorted(config_overrides(result.config, base).items())},
               "validations": metrics.get(TIME_ATTR, 0), "trial_steps": metrics.get(TRIAL_STEPS, 0),
               # of which its start race lap had run (start_race_continue), not run again
               "race_steps": metrics.get(RACE_STEPS, 0),
               "mean": metrics.get(OBJECTIVE),
               "test_mean": metrics.get("test_mean"), "error": error}
        row.update({k: v for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/"))})
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["trial_id"]))  # a restored study lists its trials in another order


def trial_resources(cfg: Config) -> dict:
    """Ray resources of one trial: `trial_resources`, else one CPU, plus one GPU when the trials use GPUs.

    A trial computes on a GPU exactly when Ray assigns it one (`mttl.device`), so use_gpu=True with
    resources that hold no GPU is refused here rather than in every trial."""
    from mttl.device import cluster_uses_gpu, requested_gpu

    on_gpu = cluster_uses_gpu(cfg)
    if cfg.trial_resources:
        resources = dict(cfg.trial_resources)
        if requested_gpu(cfg) and not resources.get("GPU"):
            raise ConfigError(f"use_gpu=True but trial_resources={resources} gives the trials no GPU; add one, "
                              f"e.g. -k trial_resources=\"{{'CPU': 1, 'GPU': 0.25}}\", or set use_gpu=auto")
        return resources
    return {"CPU": 1, "GPU": 1} if on_gpu else {"CPU": 1}


def run_sweep(cfg: Config) -> tuple[Path, list[dict]]:
    """Run (or resume) every study; returns the sweep folder (a local mirror for an output_dir URI) and
    one row per trial."""
    from mttl.data.locate import resolve_data_dir
    from mttl.device import check_before_ray
    from mttl.evaluation.zeroshot import held_out_tasks

    check_before_ray(cfg)  # use_gpu=True on a machine without GPUs: one line, before anything else
    base, module, space_name = sweep_base_config(cfg)
    tasks = list(cfg.tasks) if cfg.tasks else held_out_tasks(resolve_data_dir(base))
    if not tasks:
        raise ConfigError("no held-out tasks to sweep: name them with -k tasks=['task_a']")
    sweep_name = cfg.run_name or f"sweep_{Path(space_name).stem}"
    # a sweep in a bucket runs in a local mirror of its folder: pulled whole first (a resumed sweep's
    # Tune state), pushed back after every study and when the sweep stops, also on an error or Ctrl-C
    sweep_uri = storage.join(str(cfg.output_dir), sweep_name) if storage.is_uri(str(cfg.output_dir)) else None
    if sweep_uri is None:
        sweep_dir = (Path(cfg.output_dir) / sweep_name).resolve()
    else:
        sweep_dir = storage.pull_folder(sweep_uri, storage.local_mirror(sweep_uri, cfg.cache_dir))
    try:
        return _run_studies(cfg, base, module, space_name, tasks, sweep_dir, sweep_uri)
    finally:
        if sweep_uri is not None:
            storage.upload_folder(sweep_dir, sweep_uri, marker=None)


def _run_studies(cfg: Config, base: Config, module: ModuleType, space_name: str, tasks: list[str], sweep_dir: Path,
                 sweep_uri: str | None) -> tuple[Path, list[dict]]:
    import json

    from ray import tune

    from mttl.errors import set_interrupt_hint
    from mttl.ray_utils import init_ray, run_in_background
    from mttl.run_folder import RESULTS_CSV, atomic_write_text, safe_name, write_csv

    studies = {task: [task] for task in tasks} if cfg.study_per_task else {"all_tasks": tasks}
    for study in studies:
        check_saved_study(sweep_dir / safe_name(study), cfg, space_name)
    base.save(sweep_dir)
    init_ray(cfg)
    resources = trial_resources(cfg)
    all_rows = []
    for study, study_tasks in studies.items():
        study_dir = sweep_dir / safe_name(study)
        trainable = tune.with_resources(tune.with_parameters(_trial, base=base, tasks=study_tasks,
                                                             study_dir=str(study_dir)), resources)
        set_interrupt_hint(f"finished trials and the search state are kept in {sweep_uri or sweep_dir}; run the "
                           "same command again to resume the sweep")
        with console.library_prints_to_log(), _optuna_quiet(cfg):
            race = lambda points, study_dir=study_dir, study_tasks=study_tasks: race_start_points(  # noqa: E731
                study_dir, cfg, base, study_tasks, resources, points)
            tuner = _study_tuner(study_dir, trainable, cfg, module, space_name, resources, race)
            results = run_in_background(tuner.fit)
        rows = _trial_rows(study, results, base)
        complete = [r for r in rows if r["status"] == "complete"]
        if complete:
            best = max(complete, key=lambda r: r["mean"])
            atomic_write_text(study_dir / "best.json", json.dumps(
                {"study": study, "tasks": study_tasks, "tune_space": space_name, "trial_id": best["trial_id"],
                 "hyperparameters": {k[3:]: v for k, v in best.items() if k.startswith("hp/")},
                 "mean": best["mean"], "test_mean": best["test_mean"]}, indent=2, sort_keys=True) + "\n")
        all_rows += rows
        if rows and all(r["status"] == "error" for r in rows):
            write_csv(sweep_dir / RESULTS_CSV, all_rows)
            raise MttlError(f"every trial of study '{study}' failed, e.g.: {rows[0]['error']} "
                            f"(tracebacks: the trial folders under {study_dir})")
        write_csv(sweep_dir / RESULTS_CSV, all_rows)
        if sweep_uri is not None:  # each finished study reaches the bucket before the next starts
            storage.upload_folder(sweep_dir, sweep_uri, marker=None)
    summary = summary_table(all_rows)
    atomic_write_text(sweep_dir / "summary.md", summary + "\n")
    print(summary)
    return sweep_dir, all_rows


def summary_table(rows: list[dict]) -> str:
    """Markdown: per study the trial counts, the best complete trial, its validation and test means."""
    lines = ["| study | trials | complete | stopped | best trial | hyper-parameters | val mean | test mean |",
             "|---|---|---|---|---|---|---|---|"]
    for study in dict.fromkeys(r["study"] for r in rows):
        mine = [r for r in rows if r["study"] == study]
        complete = [r for r in mine if r["status"] == "complete"]
        stopped = sum(r["status"] == "stopped" for r in mine)
        if complete:
            best = max(complete, key=lambda r: r["mean"])
            hps = ", ".join(f"{k[3:]}={v:.3g}" if isinstance(v, float) else f"{k[3:]}={v}"
                            for k, v in best.items() if k.startswith("hp/"))
            lines.append(f"| {study} | {len(mine)} | {len(complete)} | {stopped} | {best['trial_id']} | {hps} | "
                         f"{best['mean']:.2f} | {best['test_mean']:.2f} |")
        else:
            lines.append(f"| {study} | {len(mine)} | 0 | {stopped} | – | – | – | – |")
    return "\n".join(lines)
