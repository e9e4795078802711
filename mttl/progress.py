"""Progress lines of commands that run many independent units (task x seed pairs, sweep trials).

One line per finished unit with the counts, elapsed time and ETA, never one per step: what a
user watching a cluster-wide run needs, and short enough for a job's log.
"""

from __future__ import annotations

import time

from ray.tune import Callback


def format_seconds(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(done: int, total: int, what: str, elapsed: float, finished_here: int, left: int) -> str:
    """`[done/total] what; elapsed …, ETA …`, the ETA from this process's mean time per unit."""
    eta = elapsed / finished_here * left if finished_here else 0.0
    return f"[{done}/{total}] {what}; elapsed {format_seconds(elapsed)}, ETA {format_seconds(eta)}"


class TrialProgress(Callback):
    """A Ray Tune callback printing one progress line per finished (or failed) trial of a study.

    Pickled into the study's tuner.pkl by Tune: it keeps only its study name and trial count, so a
    restored study counts its trials afresh."""

    def __init__(self, study: str, total: int):
        self.study, self.total = study, total
        self.finished, self.start = 0, None

    def __getstate__(self) -> dict:
        return {"study": self.study, "total": self.total}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["study"], state["total"])

    def on_trial_start(self, iteration, trials, trial, **info):
        self.start = self.start or time.monotonic()

    def _report(self, trial, status: str) -> None:
        from mttl.sweep import OBJECTIVE

        self.start = self.start or time.monotonic()
        self.finished += 1
        value = (trial.last_result or {}).get(OBJECTIVE)
        score = f" {OBJECTIVE} {value:.2f}" if isinstance(value, (int, float)) else ""
        from mttl import console  # Tune's own prints go to the log file meanwhile (`library_prints_to_log`)

        print(progress_line(self.finished, self.total, f"{self.study} trial {trial.trial_id} {status}{score}",
                            time.monotonic() - self.start, self.finished, self.total - self.finished),
              file=console.ours(), flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._report(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._report(trial, "failed")
