"""A fresh LoRA on a backbone (PolyRand on a LoRA checkpoint, or type A on one without adapters): its rank
is searched with the learning rate and the steps."""

FINETUNE_TYPE = "PolyRand"

GRID = [{"learning_rate": 1e-3}, {"learning_rate": 1e-4}]


def space(trial) -> dict:
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 3e-2, log=True),
            "lora_rank": trial.suggest_categorical("lora_rank", [1, 2, 4, 8, 16]),
            "steps_fraction": trial.suggest_float("steps_fraction", 0.5, 1.0)}
