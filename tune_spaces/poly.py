"""Poly / MHR: adapters and a fresh routing row trained, each with its own learning rate."""

FINETUNE_TYPE = None

GRID = [{"learning_rate": lr, "module_logits_learning_rate": mlr} for lr in (1e-3, 1e-4) for mlr in (0.5, 0.1)]


def space(trial) -> dict:
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True),
            "module_logits_learning_rate": trial.suggest_float("module_logits_learning_rate", 1e-2, 1.0, log=True)}
