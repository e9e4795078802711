"""MHR-µ: routing replaced by the uniform average and the averaged adapters trained.

There are no routing logits left to train, so only the adapter learning rate and the steps are
searched (the reference's grid also varied the routing learning rate here, which had no effect).
"""

FINETUNE_TYPE = "MuZ"

GRID = [{"learning_rate": 1e-3}, {"learning_rate": 1e-4}]


def space(trial) -> dict:
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 3e-2, log=True),
            "steps_fraction": trial.suggest_float("steps_fraction", 0.5, 1.0)}
