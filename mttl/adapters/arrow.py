"""`ArrowRouter`: zero-shot routing over a library of trained LoRA experts, no training.

Per layer, each expert's prototype is the top right-singular vector of its update B·A (a direction
in the layer's input space); each token goes to the `top_k` experts with the largest |x·prototype|
(the sign of a singular vector is arbitrary), weighted by a softmax with `temperature` over those
scores. Prototypes are computed from the experts on a layer's first call and kept for the model's
lifetime (recomputed on every call in training mode, where the experts may change).
"""

from __future__ import annotations

import torch
from torch import nn

from mttl.adapters.routing import InputRouter
from mttl.errors import ConfigError


def top_right_singular_vectors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For A [K, r, d_in], B [K, d_out, r]: the top right-singular vector [K, d_in] of each B·A,
    from the r×r core of two thin QRs (B·A = Q_b (R_b R_aᵀ) Q_aᵀ), never forming d_out × d_in."""
    q_a, r_a = torch.linalg.qr(a.double().transpose(1, 2))  # Aᵀ = Q_a R_a, Q_a [K, d_in, r]
    q_b, r_b = torch.linalg.qr(b.double())
    _, _, vh = torch.linalg.svd(r_b @ r_a.transpose(1, 2))
    return (q_a @ vh[:, 0, :].unsqueeze(-1)).squeeze(-1)


class ArrowRouter(InputRouter):
    def __init__(self, n_splits: int, n_skills: int, top_k: int = 3, temperature: float = 1.0):
        super().__init__(n_splits, n_skills)
        if not 1 <= top_k <= n_skills:
            raise ConfigError(f"arrow_top_k={top_k} must be between 1 and the library's {n_skills} experts; "
                              f"set -k arrow_top_k={min(max(top_k, 1), n_skills)}")
        if temperature <= 0:
            raise ConfigError(f"arrow_temperature must be > 0, got {temperature}")
        self.top_k, self.temperature = int(top_k), float(temperature)
        # Derived from the experts, so never saved: a plain dict keeps them out of the state dict.
        self._prototypes: dict[str, torch.Tensor] = {}

    @classmethod
    def from_adapter_config(cls, acfg) -> "ArrowRouter":
        return cls(acfg.n_splits, acfg.n_skills, acfg.arrow_top_k, acfg.arrow_temperature)

    @torch.no_grad()
    def prototypes(self, layer: nn.Module) -> torch.Tensor:
        if self.training or layer.layer_name not in self._prototypes:
            a, b = layer.expert_lora()
            self._prototypes[layer.layer_name] = top_right_singular_vectors(a, b).to(a.dtype)
        return self._prototypes[layer.layer_name]

    def token_weights(self, layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        scores = (tokens @ self.prototypes(layer).to(tokens.dtype).t()).abs()
        top, index = scores.topk(self.top_k, dim=-1)
        return torch.zeros_like(scores).scatter_(-1, index, torch.softmax(top / self.temperature, dim=-1))

    def extra_repr(self) -> str:
        return f"n_skills={self.n_skills}, top_k={self.top_k}, temperature={self.temperature}"
