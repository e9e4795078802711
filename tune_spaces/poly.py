"""Poly / MHR: adapters and a fresh routing row trained, each with its own learning rate, and how long.

The routing logits take far larger steps than the adapters (the reference's two-speed rates), so
each rate is searched on its own log scale around the reference's grid: adapters above 1e-2
diverge within the first validations, routing logits below 0.05 hardly leave their start in a
few-shot run. `steps_fraction` lets TPE find that a higher rate gets there in fewer steps (a
cheaper trial), below the configured total_steps, which no trial exceeds; below half of a few-shot
run the adapters are not formed (trials of 26–41 of 100 steps scored 19–24 where full runs of the
same task scored 30–45, benchmarks/README.md).
"""

FINETUNE_TYPE = None

GRID = [{"learning_rate": lr, "module_logits_learning_rate": mlr} for lr in (1e-3, 1e-4) for mlr in (0.5, 0.1)]


def space(trial) -> dict:
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
            "module_logits_learning_rate": trial.suggest_float("module_logits_learning_rate", 0.05, 1.0, log=True),
            "steps_fraction": trial.suggest_float("steps_fraction", 0.5, 1.0)}
