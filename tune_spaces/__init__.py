"""Search spaces for `mttl sweep`, one module per finetune type, found by file name.

A module here (or any .py file given as `tune_space=path/to/file.py`) exposes:
- `space(trial: optuna.Trial) -> dict`: an Optuna define-by-run space; returns the config
  overrides of one trial (it may also return fixed keys, e.g. `finetune_type`), plus optionally
  `steps_fraction` in (0, 1]: the trial runs that share of the configured `total_steps` (or of
  `num_train_epochs`), so the configured budget is the most any trial runs and TPE can learn that
  a larger learning rate needs fewer steps (results and best.json name the resulting total_steps);
- `GRID: list[dict]`: the reference's preset grid (`search=grid`), always at the configured steps;
- optionally `FINETUNE_TYPE` (applied unless the user set `finetune_type`) and `DEFAULTS`
  (config keys applied unless the user set them).
Adding a file adds a space: nothing else needs editing.
"""
