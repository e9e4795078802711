"""MHR-z: routing logits only (per head), the same search as Poly-z."""

from tune_spaces.poly_z import FINETUNE_TYPE, GRID, space

__all__ = ["FINETUNE_TYPE", "GRID", "space"]  # the same space under its own name
