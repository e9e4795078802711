"""(IA)³ on the held-out task (T-Few): adapters only (`A`, added fresh when the checkpoint has none)."""

FINETUNE_TYPE = "A"

GRID = [{"learning_rate": 1e-3}, {"learning_rate": 1e-4}]


def space(trial) -> dict:
    # (IA)³ scales start at 1 and tolerate larger steps than LoRA (T-Few uses 3e-3).
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True)}
