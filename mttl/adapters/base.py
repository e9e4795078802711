"""`AdaptedLinear`: what every adapter wrapper shares — the frozen base weight and bias of the
wrapped `nn.Linear` or transformers `Conv1D` (kept under their original names, so base-model
state dicts still line up), the base projection, and rebuilding the plain layer afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


class AdaptedLinear(nn.Module):
    """Base class of adapter wrappers; subclasses add adapter tensors and `forward`."""

    # Local names of the tensors a subclass adds (saved with the adapters, grouped as 'adapters').
    adapter_tensor_names: tuple[str, ...] = ()

    @classmethod
    def from_adapter_config(cls, base: nn.Module, name: str, acfg, selector=None) -> "AdaptedLinear":
        """The wrapper of `base` (full dotted name `name`) for an `AdapterConfig`; routed kinds get
        their granularity group's `selector`. `mttl.adapters.registry` names the class per modifier."""
        return cls(base)

    def __init__(self, base: nn.Module):
        super().__init__()
        if not isinstance(base, LINEAR_TYPES):
            raise TypeError(f"can only adapt nn.Linear or Conv1D layers, got {type(base).__name__}")
        # Conv1D stores its weight as [d_in, d_out]; nn.Linear as [d_out, d_in].
        self.conv1d = isinstance(base, Conv1D)
        self.in_features, self.out_features = ((base.nx, base.nf) if self.conv1d
                                               else (base.in_features, base.out_features))
        self.weight = base.weight
        self.bias = base.bias

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t() if self.conv1d else self.weight
        return F.linear(x, weight, self.bias)

    @torch.no_grad()
    def add_to_weight(self, delta: torch.Tensor) -> None:
        """W += delta, with delta in [d_out, d_in] (nn.Linear) orientation."""
        delta = delta.to(self.weight)
        self.weight.add_(delta.t() if self.conv1d else delta)

    @torch.no_grad()
    def scale_output(self, scale: torch.Tensor) -> None:
        """Fold y <- y ⊙ scale into the weight and bias."""
        if self.conv1d:
            self.weight.mul_(scale.to(self.weight).unsqueeze(0))
        else:
            self.weight.mul_(scale.to(self.weight).unsqueeze(1))
        if self.bias is not None:
            self.bias.mul_(scale.to(self.bias))

    def to_plain(self) -> nn.Module:
        """A plain layer of the wrapped type holding this wrapper's (possibly merged) weight and bias."""
        if self.conv1d:
            plain = Conv1D(self.out_features, self.in_features)
        else:
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = self.weight
        plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
