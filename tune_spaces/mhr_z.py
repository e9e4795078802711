"""MHR-z: routing logits only (per head), the same search as Poly-z."""

from tune_spaces.poly_z import FINETUNE_TYPE, GRID, space  # noqa: F401  (same space, own name)
