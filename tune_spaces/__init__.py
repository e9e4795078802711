"""Search spaces for `mttl sweep`, one module per finetune type, found by file name.

A module here (or any .py file given as `tune_space=path/to/file.py`) exposes:
- `space(trial: optuna.Trial) -> dict`: an Optuna define-by-run space; returns the config
  overrides of one trial (it may also return fixed keys, e.g. `finetune_type`);
- `GRID: list[dict]`: the reference's preset grid (`search=grid`);
- optionally `FINETUNE_TYPE` (applied unless the user set `finetune_type`) and `DEFAULTS`
  (config keys applied unless the user set them).
Adding a file adds a space: nothing else needs editing.
"""
