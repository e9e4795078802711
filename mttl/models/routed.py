"""`RoutedModel`: a Hugging Face seq2seq model with routed adapters, called with task ids.

It owns passing task ids to the adapters: every `forward` / `generate` call runs inside
`routing_context(task_ids)`, so the ids reach every adapted layer for that call only.
"""

from __future__ import annotations

import torch
from torch import nn

from mttl.adapters.routing import routing_context


class RoutedModel(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    @property
    def config(self):
        return self.hf_model.config

    @property
    def generation_config(self):
        return self.hf_model.generation_config

    @staticmethod
    def routing_context(task_ids):
        """Context in which direct calls into `hf_model` (e.g. its encoder) see `task_ids`."""
        return routing_context(task_ids)

    def forward(self, task_ids: torch.Tensor | None = None, **hf_kwargs):
        with routing_context(task_ids):
            return self.hf_model(**hf_kwargs)

    @torch.no_grad()
    def generate(self, task_ids: torch.Tensor | None = None, **hf_kwargs):
        """`hf_model.generate` with one task id per input row; beams reuse their row's id."""
        with routing_context(task_ids):
            return self.hf_model.generate(**hf_kwargs)
