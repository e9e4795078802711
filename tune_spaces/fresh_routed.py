"""PolyRand on a routed checkpoint: Poly/MHR adapters initialised afresh on the backbone, so their rank
is searched too (nothing pre-trained fixes it), with both learning rates and the steps."""

FINETUNE_TYPE = "PolyRand"

GRID = [{"learning_rate": lr, "module_logits_learning_rate": mlr} for lr in (1e-3, 1e-4) for mlr in (0.5, 0.1)]


def space(trial) -> dict:
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
            "module_logits_learning_rate": trial.suggest_float("module_logits_learning_rate", 0.05, 1.0, log=True),
            "lora_rank": trial.suggest_categorical("lora_rank", [1, 2, 4, 8, 16]),
            "steps_fraction": trial.suggest_float("steps_fraction", 0.5, 1.0)}
