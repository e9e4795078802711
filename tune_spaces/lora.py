"""LoRA adapters (non-routed) trained on the held-out task: learning rate (the reference's grid), and how long."""

FINETUNE_TYPE = None

GRID = [{"learning_rate": 1e-3}, {"learning_rate": 1e-4}]


def space(trial) -> dict:
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 3e-2, log=True),
            "steps_fraction": trial.suggest_float("steps_fraction", 0.5, 1.0)}
