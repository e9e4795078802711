"""Poly-z: only the new task's routing logits are trained: their learning rate, and how long."""

FINETUNE_TYPE = "Z"

GRID = [{"module_logits_learning_rate": 0.5}, {"module_logits_learning_rate": 0.1}]


def space(trial) -> dict:
    return {"module_logits_learning_rate": trial.suggest_float("module_logits_learning_rate", 1e-2, 1.0, log=True),
            "steps_fraction": trial.suggest_float("steps_fraction", 0.5, 1.0)}
