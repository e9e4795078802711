"""`IA3Linear`: a frozen linear layer whose output is rescaled per feature, y = (Wx + b) ⊙ l."""

from __future__ import annotations

import torch
from torch import nn

from mttl.adapters.base import AdaptedLinear


class IA3Linear(AdaptedLinear):
    """l [d_out] = 1 at init. Named `multi_lora_b` as in the reference, so its trainable regex
    (`.*lora_b.*`, the T-Few recipe) keeps selecting it."""

    adapter_tensor_names = ("multi_lora_b",)

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.multi_lora_b = nn.Parameter(torch.ones(self.out_features, device=self.weight.device,
                                                    dtype=self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        return out * self.multi_lora_b.to(out.dtype)
