"""Will a pre-training run fit in each worker's memory, and the cheapest setting that does (`mttl plan`).

Owns the memory arithmetic of a run: the configured model is built on the meta device (shapes, no
weights), adapters injected as `build_routed_model` does, and per worker it adds up the module's
weights, gradients, fp32 master weights and optimizer states for a ZeRO stage and offload, plus an
activation estimate from the micro batch and sequence lengths. Byte counts follow DeepSpeed's own
estimators (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`), which
assume every parameter trains; here only adapters, routing and selected backbone weights do, and
the frozen backbone costs its weights alone. Named shapes `t5-v1_1-{small,…,xxl}` (and the T5 v1.1 /
LM-adapt hub names when their config cannot be fetched) make it work offline.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

import torch

from mttl.config import Config
from mttl.errors import ConfigError

GB = 10**9
HEADROOM = 0.10  # of device_memory_gb kept free (see `plan`)
T5_VOCAB = 32128
# Published T5 v1.1 dimensions (gated-GELU feed-forward, untied output head, vocabulary 32128)
T5_V1_1_SHAPES = {
    "small": dict(d_model=512, d_ff=1024, num_heads=6, d_kv=64, num_layers=8),
    "base": dict(d_model=768, d_ff=2048, num_heads=12, d_kv=64, num_layers=12),
    "large": dict(d_model=1024, d_ff=2816, num_heads=16, d_kv=64, num_layers=24),
    "xl": dict(d_model=2048, d_ff=5120, num_heads=32, d_kv=64, num_layers=24),
    "xxl": dict(d_model=4096, d_ff=10240, num_heads=64, d_kv=64, num_layers=24),
}
_SHAPE_NAME = re.compile(r"^t5-v1_1-(?P<size>[a-z]+)$")
# hub names of the same architecture: google/t5-v1_1-xl, google/t5-xl-lm-adapt, …
_HUB_NAME = re.compile(r"(^|/)t5-(v1_1-(?P<a>small|base|large|xl|xxl)|(?P<b>small|base|large|xl|xxl)-lm-adapt)$")


def named_t5_config(size: str):
    import transformers

    dims = T5_V1_1_SHAPES[size]
    config = transformers.T5Config(vocab_size=T5_VOCAB, num_decoder_layers=dims["num_layers"],
                                   feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1, **dims)
    config.tie_word_embeddings = False  # set after: the constructor argument does not hold in transformers 5
    return config


def backbone_config(cfg: Config):
    """The transformers config of `cfg.model`: a named shape, a local folder or cached hub config, else a
    T5 v1.1 / LM-adapt hub name's published shape. `None` for tiny-t5 (built by `build_routed_model`)."""
    import transformers

    from mttl.models.backbone import TINY_T5

    name = cfg.model
    if not name:
        raise ConfigError("model is not set; pass -k model=t5-v1_1-xl (or small, base, large, xxl), a local "
                          "folder, a hub name or tiny-t5")
    if name == TINY_T5:
        return None
    named = _SHAPE_NAME.match(name)
    if named:
        if named["size"] not in T5_V1_1_SHAPES:
            raise ConfigError(f"model={name} is not a known shape; use one of "
                              f"{', '.join('t5-v1_1-' + s for s in T5_V1_1_SHAPES)}, a local folder or a hub name")
        return named_t5_config(named["size"])
    from mttl import storage

    if storage.is_uri(name):
        from mttl.models.backbone import remote_backbone_config

        return remote_backbone_config(name, cfg.trust_remote_code)
    try:
        return transformers.AutoConfig.from_pretrained(os.path.expanduser(name),
                                                       trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        hub = _HUB_NAME.search(name)
        if hub:
            return named_t5_config(hub["a"] or hub["b"])
    raise ConfigError(f"cannot read the config of model={name} (no such folder, and no hub access or cache); use "
                      f"-k model=t5-v1_1-xl (or small, base, large, xxl) or a local folder")


def build_meta_model(cfg: Config) -> torch.nn.Module:
    """The configured model with its adapters, on the meta device: shapes and `requires_grad`, no weights."""
    from mttl.adapters import AdapterConfig, modify_model
    from mttl.adapters.inject import freeze_embeddings
    from mttl.models.tokenizer import BYTE, load_tokenizer

    config = backbone_config(cfg)
    with torch.device("meta"):
        if config is None:
            from mttl.models.run import build_routed_model

            return build_routed_model(cfg, load_tokenizer(cfg.tokenizer or BYTE, cache_dir=cfg.cache_dir))
        import transformers

        model = transformers.AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
        if hasattr(model, "shared") and hasattr(model, "set_input_embeddings"):
            # transformers 5 unties T5's encoder/decoder token embeddings from `shared` together with the
            # output head when tie_word_embeddings=False; T5 v1.1 shares them and unties only the head
            model.set_input_embeddings(model.shared)
        model = modify_model(model, AdapterConfig.from_config(cfg))
        if cfg.freeze_embeds:
            freeze_embeddings(model)
    return model


# ------------------------------------------------------------------------------------ counting
@dataclass
class ParamCounts:
    frozen: int  # backbone weights that do not train
    adapters: int  # adapter weights (LoRA A/B, (IA)3 vectors, skill inventories)
    routing: int  # routing logits
    trained_backbone: int  # backbone weights that train (full fine-tuning, selected layers)
    largest_layer: int  # most parameters held directly by one module (ZeRO-3's gather buffer)
    optimizer_state_elems: int  # fp32 optimizer-state elements for the trained parameters

    @property
    def trained(self) -> int:
        return self.adapters + self.routing + self.trained_backbone

    @property
    def total(self) -> int:
        return self.frozen + self.trained


def _adafactor_elems(shape: torch.Size) -> int:
    # transformers' Adafactor (beta1=None): factored row/column second moments for matrices
    if len(shape) >= 2:
        return int(torch.Size(shape[:-1]).numel() + torch.Size(shape[:-2] + shape[-1:]).numel())
    return int(shape.numel())


def count_params(model: torch.nn.Module, optimizer: str = "adamw") -> ParamCounts:
    from mttl.device import adapter_tensor_ids

    adapter_ids = adapter_tensor_ids(model)
    frozen = adapters = routing = backbone = state = 0
    for name, p in model.named_parameters():  # shared (tied) parameters come once
        n = p.numel()
        if not p.requires_grad:
            frozen += n
            continue
        if name.endswith("module_logits"):
            routing += n
        elif id(p) in adapter_ids:
            adapters += n
        else:
            backbone += n
        if optimizer == "adafactor":
            state += _adafactor_elems(p.shape)
        elif optimizer in ("adamw", "adam"):
            state += 2 * n  # first and second moments; torch SGD without momentum keeps none
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return ParamCounts(frozen, adapters, routing, backbone, largest, state)


# ---------------------------------------------------------------------------------- arithmetic
@dataclass
class ModelStates:
    """Bytes one worker holds on its device (and in host RAM for what is offloaded)."""
    backbone: int
    trained_weights: int
    gradients: int
    optimizer: int  # fp32 master weights + optimizer states
    gather_buffer: int
    host: int

    @property
    def device(self) -> int:
        return self.backbone + self.trained_weights + self.gradients + self.optimizer + self.gather_buffer


def model_states(c: ParamCounts, *, stage: int, world: int, precision: str, offload_optimizer: bool = False,
                 offload_params: bool = False, live_parameters: int | None = None) -> ModelStates:
    """Per-worker bytes of weights, gradients and optimizer states.

    Half precision (DeepSpeed's bf16/fp16 modes) holds the whole module in 2 bytes and gives every
    trained parameter a 16-bit gradient, an fp32 gradient, an fp32 master copy and the optimizer's fp32
    states, as DeepSpeed's estimators count them (ZeRO-3 reduces straight into its fp32 partition, so
    no persistent 16-bit gradient there). fp32: 4 bytes weight, 4 gradient, and under ZeRO-1/2/3 a
    partitioned fp32 master copy all the same under ZeRO-1/2 and ZeRO-3 with an offloaded optimizer
    (DeepSpeed's ZeRO optimizers clone the partition they step); ZeRO-0's torch optimizer steps the
    weights themselves, and so does ZeRO-3's once mttl points it at the fp32 partition
    (`mttl.train.zero_memory.share_fp32_partition`).
    Stage 1 partitions optimizer states (and master, fp32 gradients), 2 adds the gradients, 3 the
    weights plus a gather buffer of `live_parameters` (`zero3_live_parameters`; default twice the
    largest layer), the most DeepSpeed holds gathered at once. Offloading moves the partitioned optimizer
    side (offload_optimizer) or the weights too (offload_params, stage 3) to host RAM."""
    half = precision in ("bf16", "16")
    w = 2 if half else 4
    n = world
    t = c.trained
    grad16 = (2 * t if half else 0) if stage < 3 else 0
    grad32 = 4 * t
    fp32_master = half or stage in (1, 2) or (stage >= 3 and offload_optimizer)
    optim = (4 * t if fp32_master else 0) + 4 * c.optimizer_state_elems
    backbone, weights = w * c.frozen, w * t
    if stage >= 3:
        backbone, weights = _div(backbone, n), _div(weights, n)
    grads = (grad16 if stage < 2 else _div(grad16, n)) + (grad32 if stage < (1 if half else 2) else _div(grad32, n))
    optim = optim if stage < 1 else _div(optim, n)
    gather = w * (live_parameters or 2 * c.largest_layer) if stage >= 3 else 0
    host = 0
    if offload_optimizer:
        host += grads + optim
        grads = optim = 0
    if offload_params:
        host += backbone + weights
        backbone = weights = 0
    return ModelStates(backbone, weights, grads, optim, gather, host)


def _div(x: int, n: int) -> int:
    return int(x / n)


def activation_bytes(config, *, micro_batch: int, input_len: int, output_len: int, precision: str,
                     checkpointing: bool = False) -> int:
    """Activations kept for the backward pass of one micro batch of an encoder-decoder T5.

    Per token and layer: the inputs of the layer norms and projections, Q/K/V, attention scores and
    probabilities (heads × keys), the attention output, and the gated feed-forward's four d_ff-wide
    tensors; the decoder adds cross-attention over the encoder tokens. The loss keeps the logits in the
    compute dtype and fp32 (log-softmax). Checked against the tensors autograd saves for a tiny T5 without
    dropout (+4 to +9 %); dropout masks (T5 v1.1's 0.1) are not counted. With checkpointing only each
    layer's input is kept, plus one layer recomputed at a time (not measured yet)."""
    w = 2 if precision in ("bf16", "16") else 4
    d, ff, inner = config.d_model, config.d_ff, config.num_heads * config.d_kv
    h = config.num_heads
    enc_layers, dec_layers = config.num_layers, config.num_decoder_layers or config.num_layers
    b, li, lo = micro_batch, input_len, output_len
    attn = lambda q, k: q * (4 * d + 5 * inner + h * k)  # noqa: E731 — norm, Q/K/V, out, probabilities
    ffn = lambda q: q * (4 * d + 7 * ff)  # noqa: E731 — norm, gate, GELU's tanh terms, up, product
    enc_layer = attn(li, li) + ffn(li)
    dec_layer = attn(lo, lo) + attn(lo, li) + 2 * li * inner + ffn(lo)
    logits = b * lo * config.vocab_size * (w + 8)
    if checkpointing:
        kept = b * (enc_layers * li + dec_layers * lo) * d * w
        return int(kept + b * max(enc_layer, dec_layer) * w + logits)
    return int(b * (enc_layers * enc_layer + dec_layers * dec_layer) * w + logits)


# --------------------------------------------------------------------------------------- plan
def _settings():
    """Every (stage, offload optimizer, offload params) DeepSpeed accepts."""
    for off_opt, off_par in ((False, False), (True, False), (True, True)):
        for stage in range(4):
            if not ((off_opt and stage < 1) or (off_par and stage < 3)):
                yield stage, off_opt, off_par


def _cost(fit: dict) -> tuple:
    """Cheapest first: no offload (host-device copies every step), then not ZeRO-3 (1.5x the traffic of
    data parallel; ZeRO-1/2 move the same volume as it), then fewer accumulation steps (larger, more
    efficient micro batches), then the lower stage."""
    offload = (fit["offload_optimizer"] == "cpu") + (fit["offload_params"] == "cpu")
    return offload, fit["zero_stage"] == 3, fit["gradient_accumulation_steps"], fit["zero_stage"]


def plan(cfg: Config) -> dict:
    """The per-worker memory of `cfg` and the cheapest (offload, stage, accumulation) that fits."""
    from mttl.train.deepspeed_config import micro_batch_size, offload_sections

    offload_sections(cfg)  # an offload the stage cannot do: the config's own error
    world = cfg.num_workers
    micro = micro_batch_size(cfg, world)
    model = build_meta_model(cfg)
    counts = count_params(model, cfg.optimizer)
    config = _model_config(model)
    precision = cfg.precision

    def total(stage, off_opt, off_par, mb, ckpt=False):
        states = model_states(counts, stage=stage, world=world, precision=precision,
                              offload_optimizer=off_opt, offload_params=off_par,
                              live_parameters=cfg.zero3_live_parameters)
        act = activation_bytes(config, micro_batch=mb, input_len=cfg.max_input_length,
                               output_len=cfg.max_output_length, precision=precision, checkpointing=ckpt)
        return states, act

    states, act = total(cfg.zero_stage, cfg.offload_optimizer == "cpu", cfg.offload_params == "cpu", micro,
                        ckpt=cfg.gradient_checkpointing)
    _, act_ckpt = total(cfg.zero_stage, False, False, micro, ckpt=True)
    limit = cfg.device_memory_gb * GB if cfg.device_memory_gb else None
    # headroom for what is not modelled: CUDA context, allocator fragmentation, communication buffers
    usable = None if limit is None else limit * (1 - HEADROOM)
    out = {
        "model": cfg.model, "model_modifier": cfg.model_modifier, "num_workers": world, "precision": precision,
        "optimizer": cfg.optimizer, "n_tasks": cfg.n_tasks,
        "params": {"backbone_frozen": counts.frozen, "backbone_trained": counts.trained_backbone,
                   "adapters": counts.adapters, "routing": counts.routing, "total": counts.total},
        "setting": {"zero_stage": cfg.zero_stage, "offload_optimizer": cfg.offload_optimizer,
                    "offload_params": cfg.offload_params, "micro_batch": micro,
                    "gradient_accumulation_steps": cfg.gradient_accumulation_steps},
        "per_worker_bytes": {**{k: v for k, v in asdict(states).items() if k != "host"},
                             "model_states": states.device, "activations": act,
                             "activations_with_checkpointing": act_ckpt, "total": states.device + act},
        "host_bytes_per_worker": states.host,
        "device_memory_bytes": limit,
        "usable_bytes": usable,
        "fits": None if limit is None else states.device + act <= usable,
        "cheapest_fit": None,
    }
    if limit is not None:
        per_worker = cfg.train_batch_size // world
        fits = []
        for stage, off_opt, off_par in _settings():
            for mb in (m for m in range(1, per_worker + 1) if per_worker % m == 0):
                s, a = total(stage, off_opt, off_par, mb)
                if s.device + a <= usable:
                    fits.append({"zero_stage": stage, "offload_optimizer": "cpu" if off_opt else "none",
                                 "offload_params": "cpu" if off_par else "none", "micro_batch": mb,
                                 "gradient_accumulation_steps": per_worker // mb, "total_bytes": s.device + a})
        out["cheapest_fit"] = min(fits, key=_cost, default=None)
    return out


def _model_config(model: torch.nn.Module):
    inner = getattr(model, "model", model)
    while not hasattr(inner, "config") and hasattr(inner, "model"):
        inner = inner.model
    return inner.config


def format_plan(p: dict) -> str:
    g = lambda b: f"{b / GB:9.2f} GB"  # noqa: E731
    m = lambda n: f"{n / 1e6:10.2f} M"  # noqa: E731
    s, w = p["setting"], p["per_worker_bytes"]
    lines = [
        f"model {p['model']}  modifier {p['model_modifier']}  workers {p['num_workers']}  precision {p['precision']}  "
        f"optimizer {p['optimizer']}",
        f"setting: zero_stage={s['zero_stage']} offload_optimizer={s['offload_optimizer']} "
        f"offload_params={s['offload_params']} micro_batch={s['micro_batch']} "
        f"gradient_accumulation_steps={s['gradient_accumulation_steps']}",
        "parameters:" + ("" if p["n_tasks"] else "  (n_tasks unset: one routing row; pre-training sets it from the "
                                                  "data, set -k n_tasks=N for its routing logits)"),
        *(f"  {k:<26}{m(v)}" for k, v in p["params"].items()),
        "per worker (device):",
        f"  {'frozen backbone weights':<26}{g(w['backbone'])}",
        f"  {'trained weights':<26}{g(w['trained_weights'])}",
        f"  {'gradients':<26}{g(w['gradients'])}",
        f"  {'optimizer states':<26}{g(w['optimizer'])}",
        f"  {'zero-3 gather buffer':<26}{g(w['gather_buffer'])}",
        f"  {'model states':<26}{g(w['model_states'])}",
        f"  {'activations':<26}{g(w['activations'])}",
        f"  {'(with checkpointing)':<26}{g(w['activations_with_checkpointing'])}",
        f"  {'total':<26}{g(w['total'])}",
        f"host RAM per worker (offloaded): {g(p['host_bytes_per_worker']).strip()}",
    ]
    if p["device_memory_bytes"] is None:
        lines.append("device memory: unknown; set -k device_memory_gb=80 to check the fit")
    else:
        lines.append(f"device memory: {g(p['device_memory_bytes']).strip()}, usable {g(p['usable_bytes']).strip()} "
                     f"({HEADROOM:.0%} kept free)  fits: {'yes' if p['fits'] else 'no'}")
        f = p["cheapest_fit"]
        if f is None:
            lines.append("cheapest fit: none (raise num_workers or lower max_input_length / max_output_length)")
        else:
            lines.append(f"cheapest fit: -k zero_stage={f['zero_stage']} offload_optimizer={f['offload_optimizer']} "
                         f"offload_params={f['offload_params']} gradient_accumulation_steps="
                         f"{f['gradient_accumulation_steps']}  (micro batch {f['micro_batch']}, "
                         f"{g(f['total_bytes']).strip()})")
    return "\n".join(lines)
