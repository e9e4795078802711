"""`LoRALinear`: a frozen linear layer plus one low-rank update, y = Wx + b + (alpha/r)·B A x."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mttl.adapters.base import AdaptedLinear

WARMUP_STEPS = 10_000


def lora_init_bound(d_in: int) -> float:
    """U(±bound) of A: kaiming-uniform's gain for leaky_relu(√5) over fan_in = d_in, i.e. 1/√(3·d_in)."""
    return 1.0 / math.sqrt(3.0 * d_in)


class WarmupMixin:
    """Optional linear warm-up of the adapter output over the layer's first 10,000 training calls."""

    def init_warmup(self, warmup: bool) -> None:
        self.warmup = warmup
        if warmup:
            self.register_buffer("warmup_calls", torch.zeros((), dtype=torch.long))

    def count_warmup_call(self) -> None:
        if self.warmup and self.training:
            self.warmup_calls += 1

    def warmup_factor(self) -> float:
        return min(int(self.warmup_calls) / WARMUP_STEPS, 1.0) if self.warmup else 1.0


class LoRALinear(WarmupMixin, AdaptedLinear):
    """lora_a [r, d_in] ~ U(±1/√(3·d_in)), lora_b [d_out, r] = 0 (PEFT's orientation)."""

    adapter_tensor_names = ("lora_a", "lora_b")

    @classmethod
    def from_adapter_config(cls, base, name, acfg, selector=None) -> "LoRALinear":
        return cls(base, acfg.rank, acfg.alpha, acfg.dropout, randb_init=acfg.randb_init,
                   kaiming_init=acfg.kaiming_init, warmup=acfg.warmup)

    def __init__(self, base: nn.Module, rank: int, alpha: float = 1.0, dropout: float = 0.0, *,
                 randb_init: bool = False, kaiming_init: bool = False, warmup: bool = False):
        super().__init__(base)
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = dropout
        bound = lora_init_bound(self.in_features)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        with torch.no_grad():
            if kaiming_init:
                nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            else:
                self.lora_a.uniform_(-bound, bound)
            if randb_init or warmup:
                self.lora_b.uniform_(-bound, bound)
        self.init_warmup(warmup)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count_warmup_call()
        out = self.base_forward(x)
        h = F.dropout(x, self.dropout, training=self.training).to(self.lora_a.dtype)
        down = F.linear(h, self.lora_a).to(out.dtype)
        # Scale the small B rather than the update and add with addmm: two fewer passes over the output.
        up = (self.lora_b.t() * (self.scale * self.warmup_factor())).to(out.dtype)
        return torch.addmm(out.reshape(-1, self.out_features), down.reshape(-1, self.rank), up).reshape(out.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale}"
