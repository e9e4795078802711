"""`RoutedModel`: a Hugging Face seq2seq model with routed adapters, called with task ids.

It owns passing task ids to the adapters: every `forward` / `generate` call runs inside
`routing_context(task_ids)`, so the ids reach every adapted layer for that call only; and the
training loss: with `label_smoothing` ε > 0 a training forward with labels returns the
label-smoothed token cross-entropy, (1−ε)·NLL + ε/V·Σ_v −log p_v, mean over non-ignored tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mttl.adapters.routing import routing_context


IGNORE_INDEX = -100  # the label of padding, as Hugging Face seq2seq models ignore it


class RoutedModel(nn.Module):
    def __init__(self, hf_model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.hf_model = hf_model
        self.label_smoothing = float(label_smoothing)

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
            out = self.hf_model(**hf_kwargs)
        labels = hf_kwargs.get("labels")
        # training only: validation losses and scores stay the plain likelihood
        if self.label_smoothing > 0 and self.training and labels is not None:
            logits = out.logits.float()
            out.loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing)
        return out

    @torch.no_grad()
    def generate(self, task_ids: torch.Tensor | None = None, **hf_kwargs):
        """`hf_model.generate` with one task id per input row; beams reuse their row's id."""
        with routing_context(task_ids):
            return self.hf_model.generate(**hf_kwargs)
