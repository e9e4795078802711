"""LoRA adapters (non-routed) trained on the held-out task: learning rate only, as the reference."""

FINETUNE_TYPE = None

GRID = [{"learning_rate": 1e-3}, {"learning_rate": 1e-4}]


def space(trial) -> dict:
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True)}
