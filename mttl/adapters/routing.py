"""Routing: selectors that turn task ids into mixing weights w[batch, S, K], input routers that
turn a layer's input into per-token weights w[tokens, K], and the forward-scoped routing context
through which task ids reach every adapted layer.

Selectors: `PolySelector` (learned per-task logits, Polytropon / MHR), `AverageSelector` (uniform
1/K, no parameters; MHR-µ) and `PrivateSelector` (one skill per task). One selector instance is
shared by all layers of a granularity group (`group_key`). `InputRouter` is the extension point
for routers that look at the layer input (Arrow, `mttl.adapters.arrow`): the layer hands it itself
and its input tokens, and mixes its experts' outputs with the weights it returns. Which name
builds which class is `mttl.adapters.registry`.

Task ids are set for one forward call by `routing_context(task_ids)` (a `ContextVar`, reset on
exit, so no state survives the call). Inside that call each selector computes its weights once
and every layer sharing it reuses them; a layer whose batch is m × len(task_ids) (beam search,
answer choices) gets the ids repeated m times, also computed once per selector and batch size.
`checkpoint_contexts` carries a block's routing into its recomputation under gradient checkpointing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mttl.errors import ConfigError

EPS = 1e-12
LOGITS_INIT_BOUND = 1e-3


class Selector(nn.Module):
    """Maps task ids [B] to mixing weights [B, S, K]; then optionally interpolates towards 1/K."""

    needs_task_ids = True
    routes_from_input = False

    @classmethod
    def from_adapter_config(cls, acfg) -> "Selector":
        return cls(acfg.n_splits, acfg.n_skills)

    def __init__(self, n_splits: int, n_skills: int):
        super().__init__()
        self.n_splits = n_splits
        self.n_skills = n_skills
        # w <- alpha * w + (1 - alpha) / K; 1.0 leaves the weights untouched.
        self.uniform_alpha = 1.0

    def is_stochastic(self) -> bool:
        """True when two calls with the same task id may give different weights (sampling)."""
        return False

    def n_rows(self) -> int | None:
        """How many task ids the selector can route (None: any)."""
        return None

    def mixing_weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        weights = self.mixing_weights(task_ids)
        if self.uniform_alpha != 1.0:
            weights = self.uniform_alpha * weights + (1.0 - self.uniform_alpha) / self.n_skills
        return weights


class PolySelector(Selector):
    """Per-task routing logits Z[n_tasks, S*K] (Polytropon; MHR when S > 1)."""

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int, *, relaxed_bernoulli: bool = True,
                 straight_through: bool = False, shared_skill: bool = False, average_correction: bool = False,
                 logits_dropout: float = 0.0, l2_norm: bool = False):
        super().__init__(n_splits, n_skills)
        self.relaxed_bernoulli = relaxed_bernoulli
        self.straight_through = straight_through
        self.shared_skill = shared_skill
        self.average_correction = average_correction
        self.logits_dropout = logits_dropout
        self.l2_norm = l2_norm
        self.module_logits = nn.Parameter(fresh_logits(n_tasks, n_splits * n_skills))

    @classmethod
    def from_adapter_config(cls, acfg) -> "PolySelector":
        return cls(acfg.n_tasks, acfg.n_splits, acfg.n_skills, relaxed_bernoulli=acfg.relaxed_bernoulli,
                   straight_through=acfg.straight_through, shared_skill=acfg.shared_skill,
                   average_correction=acfg.average_correction, logits_dropout=acfg.logits_dropout,
                   l2_norm=acfg.l2_norm)

    @property
    def n_tasks(self) -> int:
        # a parameter partitioned by ZeRO-3 is an empty tensor wherever DeepSpeed has not gathered it
        # (e.g. while a checkpointed block is recomputed in backward); `ds_shape` keeps its real shape
        return getattr(self.module_logits, "ds_shape", self.module_logits.shape)[0]

    def n_rows(self) -> int:
        return self.n_tasks

    def is_stochastic(self) -> bool:
        sampling = self.relaxed_bernoulli and not self.l2_norm
        return self.training and (sampling or self.logits_dropout > 0)

    def mixing_weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        task_ids = task_ids.to(self.module_logits.device)
        logits = self.module_logits[task_ids].view(-1, self.n_splits, self.n_skills)
        if self.l2_norm:
            return F.normalize(logits, p=2.0, dim=-1)
        if self.training and self.relaxed_bernoulli:
            probs = relaxed_bernoulli_sample(logits)
        elif self.straight_through:
            soft = torch.sigmoid(logits)
            probs = soft + (torch.round(soft) - soft).detach()
        else:
            probs = torch.sigmoid(logits)
        # The reference builds a fresh nn.Dropout inside forward, so its routing dropout stays
        # active at evaluation; here it is applied in training only.
        if self.logits_dropout > 0:
            probs = F.dropout(probs, self.logits_dropout, training=self.training)
        if self.shared_skill:
            probs = torch.cat([probs[..., :-1], torch.ones_like(probs[..., -1:])], dim=-1)
        if self.average_correction:
            return probs * (math.sqrt(self.n_splits) / math.sqrt(self.n_skills))
        return probs / (probs.sum(dim=-1, keepdim=True) + EPS)

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, n_splits={self.n_splits}, n_skills={self.n_skills}"


class AverageSelector(Selector):
    """Uniform 1/K routing for every task (MHR-µ / Poly-µ); no parameters."""

    needs_task_ids = False

    def __init__(self, n_splits: int, n_skills: int):
        super().__init__(n_splits, n_skills)
        # Named module_probs (not module_logits) so it never clashes with saved logits by name.
        self.register_buffer("module_probs", torch.full((n_splits, n_skills), 1.0 / n_skills))

    def mixing_weights(self, task_ids: torch.Tensor | None) -> torch.Tensor:
        batch = 1 if task_ids is None else len(task_ids)
        return self.module_probs.unsqueeze(0).expand(batch, -1, -1)


class PrivateSelector(Selector):
    """One skill per task: one-hot weights over K = n_tasks skills, the same for every head."""

    def n_rows(self) -> int:
        return self.n_skills

    def mixing_weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(task_ids, self.n_skills).to(torch.get_default_dtype())
        return one_hot.unsqueeze(1).expand(-1, self.n_splits, -1)


class InputRouter(Selector):
    """A router that sees the layer input: `token_weights(layer, tokens [t, d_in])` returns
    weights [t, K] over the layer's K experts, and the layer adds Σ_k w_k·(its expert k's output)
    per token. It needs no task ids; it may keep per-layer state (keyed by `layer.layer_name`)
    since one instance can serve many layers."""

    needs_task_ids = False
    routes_from_input = True

    def token_weights(self, layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def route_tokens(self, layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        weights = self.token_weights(layer, tokens)
        if self.uniform_alpha != 1.0:
            weights = self.uniform_alpha * weights + (1.0 - self.uniform_alpha) / self.n_skills
        return weights

    def mixing_weights(self, task_ids):
        raise ConfigError(f"{type(self).__name__} routes each token from the layer input; it has no per-task "
                          f"weights (only routed LoRA layers can use it)")


def relaxed_bernoulli_sample(logits: torch.Tensor) -> torch.Tensor:
    """A reparameterised binary-concrete sample at temperature 1, σ(z + logit(u)) with u ~ U(0, 1):
    the draws and clamping of torch's RelaxedBernoulli(1, logits).rsample(), written as five
    tensor ops instead of the distribution object's ~15 (it runs once per routed layer per step)."""
    tiny = torch.finfo(logits.dtype).eps
    noise = torch.rand_like(logits).clamp_(tiny, 1 - tiny).logit_()
    return torch.sigmoid(logits + noise).clamp(tiny, 1 - tiny)


def fresh_logits(n_tasks: int, width: int) -> torch.Tensor:
    return torch.empty(n_tasks, width).uniform_(-LOGITS_INIT_BOUND, LOGITS_INIT_BOUND)


def build_selector(acfg) -> Selector:
    """A new router of the kind `acfg.selector` names (an `AdapterConfig`), found in the registry."""
    from mttl.adapters.registry import router_class

    return router_class(acfg.selector).from_adapter_config(acfg)


_INDEX = re.compile(r"\d+")


def group_key(layer_name: str, granularity: str) -> str:
    """The name of the selector group a layer belongs to (layers with equal keys share a selector)."""
    parts = layer_name.split(".")
    if granularity == "finegrained":
        return layer_name
    if granularity == "coarsegrained":
        return "model"
    if granularity == "layerwise":
        # The parent module (T5: block.<i>.layer.<j>.SelfAttention) = one sub-layer.
        return ".".join(parts[:-1]) or layer_name
    if granularity == "coderwise":
        for i, part in enumerate(parts):
            if part in ("encoder", "decoder"):
                return ".".join(parts[: i + 1])
        raise ConfigError(f"router_granularity=coderwise: layer '{layer_name}' is in neither an encoder nor a "
                          f"decoder; use finegrained, layerwise or coarsegrained")
    if granularity == "blockwise":
        for i, part in enumerate(parts):
            if _INDEX.fullmatch(part):
                return ".".join(parts[: i + 1])
        raise ConfigError(f"router_granularity=blockwise: layer '{layer_name}' is not inside a numbered block; "
                          f"use finegrained, layerwise or coarsegrained")
    raise ConfigError(f"unknown router_granularity {granularity!r}")


# ----------------------------------------------------------------------------- routing context
@dataclass
class _Routing:
    task_ids: torch.Tensor
    single_task: bool
    max_id: int
    weights: dict = field(default_factory=dict)  # (selector, rows) -> weights


_ACTIVE: contextvars.ContextVar[_Routing | None] = contextvars.ContextVar("mttl_routing", default=None)


@contextlib.contextmanager
def routing_context(task_ids):
    """Make `task_ids` (one per example) visible to every adapted layer for the calls inside."""
    if task_ids is None:
        token = _ACTIVE.set(None)
    else:
        ids = torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("task_ids is empty")
        # One host sync per call (not one per layer): the range and whether all ids are equal.
        low, high = torch.stack(torch.aminmax(ids)).tolist()
        if low < 0:
            raise IndexError(f"task ids must be >= 0, got {ids.tolist()}")
        token = _ACTIVE.set(_Routing(ids, low == high, high))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class _Restore:
    """Sets one routing snapshot for the calls inside; re-enterable (a second backward recomputes again)."""

    def __init__(self, routing: _Routing | None):
        self.routing = routing
        self.tokens: list = []

    def __enter__(self):
        self.tokens.append(_ACTIVE.set(self.routing))

    def __exit__(self, *exc):
        _ACTIVE.reset(self.tokens.pop())


def checkpoint_contexts():
    """`context_fn` for non-reentrant `torch.utils.checkpoint`: (forward, recomputation) contexts.

    Backward recomputes a checkpointed block after `routing_context` has exited (and, on a GPU, in
    autograd's own thread, which a ContextVar does not reach), so the block's routing is captured when
    its forward starts and set again while it is recomputed. The captured cache holds only the weights
    computed before the block: a selector first used inside the block is recomputed there (with the
    RNG state the checkpoint restores), as in the forward, so both runs save the same tensors.
    """
    routing = _ACTIVE.get()
    snapshot = None if routing is None else _Routing(routing.task_ids, routing.single_task, routing.max_id,
                                                     dict(routing.weights))
    return contextlib.nullcontext(), _Restore(snapshot)


def current_weights(selector: Selector, batch_size: int, layer_name: str) -> tuple[torch.Tensor, bool]:
    """The routing weights for a layer's batch: ([1, S, K], True) when every example shares the
    same deterministic weights, else ([batch_size, S, K], False). Cached per selector per call."""
    routing = _ACTIVE.get()
    if not selector.needs_task_ids:
        if routing is None:
            return selector(None), True
        key = (selector, 1)
        if key not in routing.weights:
            routing.weights[key] = selector(None)
        return routing.weights[key], True
    if routing is None:
        raise RuntimeError(f"routed layer '{layer_name}' was called without task ids; call the model through "
                           f"RoutedModel(...)(task_ids=..., ...) or inside routing_context(task_ids)")
    n_rows = selector.n_rows()
    if n_rows is not None and routing.max_id >= n_rows:
        raise IndexError(f"task id {routing.max_id} has no routing row in layer '{layer_name}': its selector has "
                         f"{n_rows} (add rows with mttl.adapters.ops.add_task_rows)")
    n_ids = len(routing.task_ids)
    if batch_size % n_ids:
        raise ValueError(f"routed layer '{layer_name}' got a batch of {batch_size} rows for {n_ids} task ids; "
                         f"the batch must be a multiple of the number of task ids")
    single = routing.single_task and not selector.is_stochastic()
    rows = 1 if single else batch_size
    key = (selector, rows)
    if key not in routing.weights:
        ids = routing.task_ids[:1] if single else routing.task_ids.repeat_interleave(batch_size // n_ids)
        routing.weights[key] = selector(ids)
    return routing.weights[key], single
