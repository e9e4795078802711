"""Full fine-tuning (`F`): every backbone parameter trained; smaller learning rates than adapters."""

FINETUNE_TYPE = "F"

GRID = [{"learning_rate": 1e-3}, {"learning_rate": 1e-4}]


def space(trial) -> dict:
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-3, log=True)}
