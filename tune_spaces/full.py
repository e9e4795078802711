"""Full fine-tuning (`F`): every backbone parameter trained; smaller learning rates than adapters, and
weight decay, which keeps a few-shot run of every weight near the pre-trained ones."""

FINETUNE_TYPE = "F"

GRID = [{"learning_rate": 1e-3}, {"learning_rate": 1e-4}]


def space(trial) -> dict:
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-3, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.1),
            "steps_fraction": trial.suggest_float("steps_fraction", 0.5, 1.0)}
