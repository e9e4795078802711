"""MHR (multi-head routing): the same two-speed search as Poly; the heads come from the checkpoint."""

from tune_spaces.poly import FINETUNE_TYPE, GRID, space

__all__ = ["FINETUNE_TYPE", "GRID", "space"]  # the same space under its own name
