"""The reference's few-shot settings for T0, used wherever the user set no value of their own.

`T0_FINETUNE` is the reference's `configs/t0/finetune.json` and `T0_TASKS[task]` its per-task file
(`configs/t0/<task>.json`), in this repo's key names; `mttl/configs/t0/finetune.json` and
`mttl/configs/t0/<task>.json` ship the same values (a test checks that they agree).
`apply_presets(merged, user, task)` fills every such key that the user's -c files and -k did not
set, when the data is T0: `mttl finetune`, `mttl sweep` and `mttl evaluate` on T0 data then score
and train as the reference did (rank classification length-normalised, T-Few losses, Adafactor).

Batch sizes are this repo's: `train_batch_size` is the global batch (micro batch × accumulation),
so the reference's h-swag micro batch of 4 with 2 accumulation steps is `train_batch_size=8`.
"""

from __future__ import annotations

from mttl.config import Config

# configs/t0/finetune.json of the reference (its `precision: bf16` is left out: precision follows the
# hardware the user runs on, and bf16 autocast on CPU is slower than float32; -k precision=bf16 on a GPU).
T0_FINETUNE = {"optimizer": "adafactor", "warmup_proportion": 0.06, "total_steps": 1000, "learning_rate": 3e-3,
               "max_grad_norm": 1.0, "weight_decay": 0.0}
# configs/t0/<task>.json of the reference: the same for every task but h-swag.
_TASK = {"train_batch_size": 8, "predict_batch_size": 16, "gradient_accumulation_steps": 1, "length_norm": 1.0,
         "mc_loss": 1.0, "unlikely_loss": 1.0}
T0_TASKS = {task: dict(_TASK) for task in ("cb", "rte", "copa", "wic", "wsc", "winogrande", "anli-r1", "anli-r2",
                                           "anli-r3", "storycloze")}
T0_TASKS["h-swag"] = {**_TASK, "train_batch_size": 8, "gradient_accumulation_steps": 2}


def presets_for(dataset: str | None, task: str | None) -> dict:
    """The preset values for `task` of `dataset` (any T0 task: the common per-task values)."""
    if dataset != "t0":
        return {}
    return {**T0_FINETUNE, **T0_TASKS.get(task or "", _TASK)}


def apply_presets(merged: Config, user: Config, task: str | None) -> Config:
    """`merged` with every preset key `user` did not set taken from the presets (in place)."""
    for key, value in presets_for(merged.dataset, task).items():
        if not user.was_overridden(key):
            setattr(merged, key, value)
    return merged
