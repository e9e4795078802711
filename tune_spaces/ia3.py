"""(IA)³ on the held-out task (T-Few): adapters only (`A`, added fresh when the checkpoint has none)."""

FINETUNE_TYPE = "A"

GRID = [{"learning_rate": 1e-3}, {"learning_rate": 1e-4}]


def space(trial) -> dict:
    # (IA)³ scales start at 1 and tolerate larger steps than LoRA (T-Few uses 3e-3); warm-up matters
    # more for them, since a large first step scales whole activations.
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True),
            "warmup_proportion": trial.suggest_float("warmup_proportion", 0.0, 0.2),
            "steps_fraction": trial.suggest_float("steps_fraction", 0.5, 1.0)}
