"""Routed adapters: an inventory of K skills split into S heads, mixed per example by a selector.

`SkilledLoRALinear` (Poly when S = 1, MHR when S > 1, plain shared LoRA when K = 1):
lora_a [S, K, d_in/S, r], lora_b [S, K, r, d_out/S]; per example and head q,
A_q = Σ_k w[q,k] A[q,k] and B_q = Σ_k w[q,k] B[q,k]; the heads stack along the input dims of A
and the output dims of B; y = Wx + b + (alpha/r)·x A B.
`SkilledIA3Linear` (routed (IA)³): lora_a [K, S, d_out/S] = 1; y = (Wx + b) ⊙ [Σ_k w[q,k] L[k,q]]_q.

Both mix once per batch when the routing context says every example shares its weights (one task,
deterministic routing) and otherwise mix per example with batched matmuls. Sampled routing (the
relaxed Bernoulli in training, as in PEFT and the reference) draws per row, so a single-task
training batch mixes per row too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mttl.adapters.base import AdaptedLinear
from mttl.adapters.lora import WarmupMixin, lora_init_bound
from mttl.adapters.routing import Selector, current_weights
from mttl.errors import ConfigError


class MixSkills(torch.autograd.Function):
    """`bmm(weights [S, rows, K], skills [S, K, …] flattened to [S, K, F])` → [S, rows, F], keeping the
    skills parameter itself for the backward rather than the flattened view autograd would keep.

    Under ZeRO-3 a layer's parameters are gathered for its forward and released after it; a saved
    view holds the gathered storage until the backward, so every routed layer's skills stayed whole
    on every rank through the forward (0.68 GB per worker for MHR on the T5-large-shaped benchmark).
    The parameter itself is what DeepSpeed gathers again for the backward, as for a linear weight."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, skills: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights, skills)
        return torch.bmm(weights, skills.reshape(skills.shape[0], skills.shape[1], -1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, skills = ctx.saved_tensors
        # under autocast the forward's bmm ran in its dtype (grad's); autograd's own graph would cast
        # the inputs there and the gradients back, and so does this
        flat = skills.reshape(skills.shape[0], skills.shape[1], -1).to(grad.dtype)
        grad_weights = grad_skills = None
        if ctx.needs_input_grad[0]:
            grad_weights = torch.bmm(grad, flat.transpose(1, 2)).to(weights.dtype)
        if ctx.needs_input_grad[1]:
            grad_skills = torch.bmm(weights.to(grad.dtype).transpose(1, 2), grad).reshape(skills.shape).to(skills.dtype)
        return grad_weights, grad_skills


def _check_divisible(layer_name: str, n_splits: int, **dims: int) -> None:
    for dim_name, size in dims.items():
        if size % n_splits:
            raise ConfigError(f"layer '{layer_name}': n_splits={n_splits} does not divide its {dim_name}={size}; "
                              f"choose an n_splits that divides every adapted layer's dims, or exclude the layer "
                              f"with modify_modules/modify_layers")


class SkilledLoRALinear(WarmupMixin, AdaptedLinear):
    adapter_tensor_names = ("lora_a", "lora_b")

    @classmethod
    def from_adapter_config(cls, base, name, acfg, selector=None) -> "SkilledLoRALinear":
        return cls(base, selector, layer_name=name, rank=acfg.rank, n_skills=acfg.n_skills, n_splits=acfg.n_splits,
                   alpha=acfg.alpha, dropout=acfg.dropout, randb_init=acfg.randb_init,
                   kaiming_init=acfg.kaiming_init, warmup=acfg.warmup)

    def __init__(self, base: nn.Module, selector: Selector, *, layer_name: str, rank: int, n_skills: int,
                 n_splits: int, alpha: float = 1.0, dropout: float = 0.0, randb_init: bool = False,
                 kaiming_init: bool = False, warmup: bool = False):
        super().__init__(base)
        _check_divisible(layer_name, n_splits, d_in=self.in_features, d_out=self.out_features)
        self.layer_name = layer_name
        self.selector = selector
        self.rank, self.n_skills, self.n_splits = rank, n_skills, n_splits
        self.scale = alpha / rank
        self.dropout = dropout
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(n_splits, n_skills, self.in_features // n_splits, rank, **factory))
        self.lora_b = nn.Parameter(torch.zeros(n_splits, n_skills, rank, self.out_features // n_splits, **factory))
        bound = lora_init_bound(self.in_features)
        with torch.no_grad():
            if kaiming_init:
                for q in range(n_splits):
                    for k in range(n_skills):
                        block = torch.empty(rank, self.in_features // n_splits, **factory)
                        nn.init.kaiming_uniform_(block, a=math.sqrt(5))
                        self.lora_a[q, k] = block.t()
            else:
                self.lora_a.uniform_(-bound, bound)
            if randb_init or warmup:
                self.lora_b.uniform_(-bound, bound)
        self.init_warmup(warmup)

    def mixed_lora(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed A [rows, r, d_in] and B [rows, r, d_out] for weights [rows, S, K].

        A is laid out like a linear layer's weight (out × in): on CPU, x·Aᵀ in that layout is
        several times faster than x·A with A as [d_in, r], since r is small."""
        rows = weights.shape[0]
        n_splits, n_skills, rank = self.n_splits, self.n_skills, self.rank
        # One bmm per tensor, batched over the heads ([S, rows, K] @ [S, K, ·]); einsum would plan,
        # permute and copy the same product with several more autograd nodes (measured ~0.4 ms a
        # layer per step at d_model 128).
        by_head = weights.transpose(0, 1)
        a = MixSkills.apply(by_head, self.lora_a)
        b = MixSkills.apply(by_head, self.lora_b)
        a = a.view(n_splits, rows, -1, rank).permute(1, 3, 0, 2).reshape(rows, rank, self.in_features)
        b = b.view(n_splits, rows, rank, -1).permute(1, 2, 0, 3).reshape(rows, rank, self.out_features)
        return a, b

    def expert_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each skill as a full-width LoRA, A [K, r, d_in] and B [K, d_out, r] (PEFT's orientation):
        the update this layer applies when every head routes one-hot to that skill."""
        a = self.lora_a.permute(1, 0, 2, 3).reshape(self.n_skills, self.in_features, self.rank).transpose(1, 2)
        b = self.lora_b.permute(1, 2, 0, 3).reshape(self.n_skills, self.rank, self.out_features).transpose(1, 2)
        return a, b

    def forward_per_token(self, x: torch.Tensor) -> torch.Tensor:
        """An input router's weights w [t, K] per token: y = Wx + b + scale·Σ_k w_k B_k A_k x (the
        experts' outputs are mixed, not their A and B as with per-task weights)."""
        out = self.base_forward(x)
        h = F.dropout(x, self.dropout, training=self.training).to(self.lora_a.dtype)
        tokens = h.reshape(-1, self.in_features)
        weights = self.selector.route_tokens(self, tokens).to(tokens.dtype)
        a, b = self.expert_lora()
        down = torch.einsum("tf,krf->tkr", tokens, a) * weights.unsqueeze(-1)
        delta = torch.einsum("tkr,kor->to", down, b) * (self.scale * self.warmup_factor())
        return out + delta.reshape(out.shape).to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.selector.routes_from_input:
            self.count_warmup_call()
            return self.forward_per_token(x)
        weights, shared = current_weights(self.selector, x.shape[0], self.layer_name)
        self.count_warmup_call()
        out = self.base_forward(x)
        h = F.dropout(x, self.dropout, training=self.training).to(self.lora_a.dtype)
        a, b = self.mixed_lora(weights.to(self.lora_a))
        # Scaling the small mixed B instead of the update, and adding with addmm/baddbmm, saves
        # two passes over the [batch, length, d_out] output.
        b = (b * (self.scale * self.warmup_factor())).to(out.dtype)
        if shared:
            down = F.linear(h, a[0]).to(out.dtype)
            return torch.addmm(out.reshape(-1, self.out_features), down.reshape(-1, self.rank), b[0]).reshape(out.shape)
        rows = x.shape[0]
        down = torch.bmm(h.reshape(rows, -1, self.in_features), a.transpose(1, 2)).to(out.dtype)
        return torch.baddbmm(out.reshape(rows, -1, self.out_features), down, b).reshape(out.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, n_skills={self.n_skills}, n_splits={self.n_splits}"


class SkilledIA3Linear(AdaptedLinear):
    # Named lora_a as in the reference, so its trainable regex `.*lora_[ab].*` keeps selecting it.
    adapter_tensor_names = ("lora_a",)

    @classmethod
    def from_adapter_config(cls, base, name, acfg, selector=None) -> "SkilledIA3Linear":
        return cls(base, selector, layer_name=name, n_skills=acfg.n_skills, n_splits=acfg.n_splits)

    def __init__(self, base: nn.Module, selector: Selector, *, layer_name: str, n_skills: int, n_splits: int):
        super().__init__(base)
        _check_divisible(layer_name, n_splits, d_out=self.out_features)
        self.layer_name = layer_name
        self.selector = selector
        self.n_skills, self.n_splits = n_skills, n_splits
        self.lora_a = nn.Parameter(torch.ones(n_skills, n_splits, self.out_features // n_splits,
                                              device=self.weight.device, dtype=self.weight.dtype))

    def mixed_scale(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-feature scales [rows, d_out] for weights [rows, S, K]."""
        return torch.einsum("bqk,kqe->bqe", weights, self.lora_a).reshape(weights.shape[0], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, shared = current_weights(self.selector, x.shape[0], self.layer_name)
        out = self.base_forward(x)
        scale = self.mixed_scale(weights.to(self.lora_a)).to(out.dtype)
        if shared:
            return out * scale[0]
        rows = x.shape[0]
        return (out.reshape(rows, -1, self.out_features) * scale.unsqueeze(1)).reshape(out.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_skills={self.n_skills}, n_splits={self.n_splits}"
