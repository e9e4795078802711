"""Training checkpoints and the resume rules of a run folder.

A checkpoint directory (reported through `ray.train.report`, kept by Ray Train under the run
folder) holds:
- `adapters.safetensors` + `adapters.json`: the trained adapter and routing tensors (full tensors,
  gathered under ZeRO-3), readable without DeepSpeed;
- `deepspeed/`: DeepSpeed's engine, optimizer and scheduler state of every rank, saved without
  frozen parameters, so the frozen backbone is never copied into a checkpoint;
- `trainer_state.json`: optimizer step, data position (epoch, micro batches consumed in it) and
  the warm-up length fixed at the start of the run.

DeepSpeed's own state files are read with `torch.load(weights_only=True)`; nothing else in a run
folder is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mttl.config import SECURITY_KEYS, Config
from mttl.errors import CheckpointError
from mttl.run_folder import atomic_write_text
from mttl.train.deepspeed_config import save_group_numel

CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
TRAINER_STATE = "trainer_state.json"

# Keys that say where or how verbosely a run executes, not what it computes: a resumed run may
# change them. `total_steps` may grow; every other difference is refused.
RESUMABLE_KEYS = ("ray_address", "resources_per_worker", "max_failures", "log_every", "tensorboard",
                  "mlflow_tracking_uri", "wandb_project", "num_to_keep")


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    warmup_steps: int = 0


def check_resume(saved: Config, cfg: Config, saved_path: Path) -> None:
    """Refuse to continue a run under a config that differs in anything but growing total_steps."""
    # a saved config never carries security keys (Config.load drops them): this command's own decide
    differing = saved.diff(cfg, ignore=RESUMABLE_KEYS + SECURITY_KEYS + ("total_steps",))
    if differing:
        keys = ", ".join(f"{k} ({a!r} → {b!r})" for k, (a, b) in sorted(differing.items()))
        raise CheckpointError(f"run folder {saved_path.parent} was started with a different config: {keys}; "
                              "use the same values or a new run_name")
    if cfg.total_steps < saved.total_steps:
        raise CheckpointError(f"run folder {saved_path.parent} has total_steps={saved.total_steps}; it can only be "
                              f"continued to a larger total, not {cfg.total_steps} (use a new run_name)")


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], zero_stage: int):
    """Full tensors of ZeRO-3 partitioned parameters inside the block (a collective: every rank enters)."""
    if zero_stage == 3 and params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def save_checkpoint(engine, model: torch.nn.Module, folder: str | os.PathLike, state: TrainerState,
                    cfg: Config, meta: dict, rank: int) -> None:
    """Every rank calls this (DeepSpeed's save and ZeRO-3 gathering are collectives)."""
    folder = Path(folder)
    with without_frozen_tensors(engine):
        engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    if cfg.model_modifier:
        save_adapter_tensors(model, folder, meta, cfg.zero_stage, rank,
                             save_group_numel(cfg, model) if cfg.zero_stage == 3 else None)
    if rank == 0:
        atomic_write_text(folder / TRAINER_STATE, json.dumps(asdict(state), indent=2) + "\n")


@contextlib.contextmanager
def without_frozen_tensors(engine):
    """Keep every frozen tensor out of DeepSpeed's saved module state.

    `exclude_frozen_parameters` drops frozen parameters by name only; a frozen tensor reachable
    under a second name (T5's `shared` embedding is also `encoder.embed_tokens` and
    `decoder.embed_tokens`) would still be written, so entries sharing a frozen tensor's storage go.
    """
    frozen = {p.data_ptr() for p in engine.module.parameters() if not p.requires_grad and p.numel()}
    full_state = engine.module_state_dict

    def trainable_state(*args, **kwargs):
        state = full_state(*args, **kwargs)
        for name in [n for n, t in state.items() if t.numel() and t.data_ptr() in frozen]:
            del state[name]
        return state

    engine.module_state_dict = trainable_state
    try:
        yield
    finally:
        del engine.module_state_dict  # back to the class's method


def save_adapter_tensors(model: torch.nn.Module, folder: Path, meta: dict, zero_stage: int, rank: int,
                         group_numel: int | None = None) -> None:
    """The adapters file of a checkpoint or `final/` (every rank enters; rank 0 writes).

    Under ZeRO-3 the adapter and routing tensors are gathered a group of at most `group_numel`
    elements at a time and written as they come, so no rank ever holds them whole: gathering them
    all on every rank was the largest allocation of a partitioned run (+0.68 GB per worker for MHR
    on the T5-large-shaped benchmark)."""
    from mttl.adapters.inject import adapter_tensors
    from mttl.adapters.state import AdapterWriter

    named = list(adapter_tensors(model).items())
    writer = AdapterWriter(model, folder, meta) if rank == 0 else None
    try:
        for group in numel_groups(named, group_numel if zero_stage == 3 else None):
            with gathered([t for _, t in group if hasattr(t, "ds_id")], zero_stage):  # buffers are never partitioned
                if writer is not None:
                    for name, tensor in group:
                        writer.write(name, tensor)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.commit()


def numel_groups(named: list[tuple[str, torch.Tensor]], limit: int | None) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most `limit` elements (counted whole: `ds_numel`), one group when None;
    a tensor larger than the limit is a group of its own."""
    if limit is None:
        return [named] if named else []
    groups, size = [[]], 0
    for name, tensor in named:
        numel = getattr(tensor, "ds_numel", tensor.numel())
        if groups[-1] and size + numel > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, tensor))
        size += numel
    return groups if groups[0] else []


BACKBONE_INDEX = "model.safetensors.index.json"  # transformers' index of a backbone saved in shards


def save_backbone_shards(model: torch.nn.Module, tokenizer, folder: Path, group_numel: int, rank: int) -> None:
    """A ZeRO-3 partitioned backbone saved in transformers' sharded format, one group of at most
    `group_numel` parameters gathered at a time (every rank enters; rank 0 writes).

    Gathering the whole backbone to call `save_pretrained` puts every weight on every rank at once:
    for a 3B backbone 12 GB (fp32) more per worker, on the devices ZeRO-3 was chosen to relieve. Here
    no rank holds more than its partition and one group. Adapter and routing tensors are left out
    (they are saved with the adapters); a tied weight is written once, as `save_pretrained` does, and
    `from_pretrained` ties it again."""
    from safetensors.torch import save_file

    from mttl.adapters.inject import adapter_tensors

    hf_model = model.hf_model
    skip = {id(t) for t in adapter_tensors(hf_model).values()}
    named = [(n, p) for n, p in hf_model.named_parameters() if id(p) not in skip]
    groups = numel_groups(named, group_numel)
    weight_map, total = {}, 0
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    for i, group in enumerate(groups, 1):
        with gathered([param for _, param in group], 3):
            tensors = ({name: param.detach().to("cpu", copy=True).contiguous() for name, param in group}
                       if rank == 0 else {})
        if rank == 0:
            shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_file(tensors, str(folder / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
    if rank == 0:
        persistent = set(hf_model.state_dict(keep_vars=True))  # names only; buffers are never partitioned
        buffers = {n: b.detach().cpu().contiguous() for n, b in hf_model.named_buffers()
                   if n in persistent and id(b) not in skip}
        if buffers:
            save_file(buffers, str(folder / "buffers.safetensors"), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(buffers, "buffers.safetensors"))
            total += sum(b.numel() * b.element_size() for b in buffers.values())
        atomic_write_text(folder / BACKBONE_INDEX, json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        hf_model.config.save_pretrained(folder)
        if getattr(hf_model, "generation_config", None) is not None:
            hf_model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def _registered(snapshot: str | bytes | None) -> list[tuple[int, str]]:
    """(step, folder name) of the checkpoints a Ray Train snapshot registers, newest first."""
    try:
        results = json.loads(snapshot).get("checkpoint_results", [])
        found = [(int(r["metrics"]["step"]), str(r["checkpoint_dir_name"])) for r in results]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []  # no snapshot yet, or one Ray Train will rewrite
    return sorted(found, key=lambda item: item[0], reverse=True)


def registered_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints Ray Train has registered in `run_dir`, newest first."""
    try:
        snapshot = (Path(run_dir) / CHECKPOINT_SNAPSHOT).read_text()
    except OSError:
        return []
    return [(step, Path(run_dir) / name) for step, name in _registered(snapshot)]


def older_checkpoints(run_dir: Path, latest: Path) -> list[Path]:
    """Registered checkpoints other than `latest`, newest first: the fallbacks when it is damaged."""
    return [folder for _, folder in registered_checkpoints(run_dir) if folder.name != Path(latest).name]


def older_bucket_checkpoints(run_uri: str, latest: str, into: Path, fs=None) -> Iterator[Path]:
    """The same fallbacks for a run in a bucket, each downloaded into `into` only when the one before it
    was damaged (a healthy resume downloads nothing more than the latest checkpoint)."""
    from mttl import storage

    snapshot = storage.read_bytes(storage.join(run_uri, CHECKPOINT_SNAPSHOT), fs)
    for _, name in _registered(snapshot):
        if name != latest:
            yield storage.download_folder(storage.join(run_uri, name), Path(into) / name, fs=fs)


def usable_checkpoint(candidates: Iterable[Path], rank: int,
                      where=lambda folder: str(folder)) -> tuple[Path, TrainerState, list[str]]:
    """The first candidate whose files all read back, and why each damaged one before it was skipped
    (each named by `where`: for a run in a bucket, its URI rather than the local copy's temp path).

    Every rank checks the same files and so reaches the same choice.
    """
    skipped = []
    for folder in candidates:
        try:
            return folder, verify_checkpoint(folder), skipped
        except CheckpointError as err:
            err = CheckpointError(str(err).replace(str(folder), where(folder)))
            skipped.append(str(err))
            if rank == 0:
                print(f"[mttl] warning: {err}; trying the previous checkpoint", file=sys.__stderr__, flush=True)
    raise CheckpointError(f"no intact checkpoint to resume from ({'; '.join(skipped)}); "
                          "remove the damaged run folder or start a new run_name")


def load_checkpoint(engine, folder: str | os.PathLike) -> TrainerState:
    folder = Path(folder)
    state_file = folder / TRAINER_STATE
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {TRAINER_STATE}; it was not written by mttl pretrain")
    with weights_only_loading(engine):
        path, _ = engine.load_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=False)
    if path is None:
        raise CheckpointError(f"checkpoint {folder} holds no DeepSpeed state under {DEEPSPEED_DIR}/")
    return TrainerState(**json.loads(state_file.read_text()))


def deepspeed_safe_globals() -> list:
    """Exactly the DeepSpeed classes its checkpoints pickle besides tensors and containers.

    ZeRO-1/2/3 optimizer states hold the loss scaler object (`LossScaler`, or `DynamicLossScaler`
    under fp16), the stage enum and, for bf16 fragments, `fragment_address`. Anything else in a
    state file is refused by `torch.load(weights_only=True)`.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def safe_load(path: str | os.PathLike, map_location=None):
    """`torch.load` of a DeepSpeed state file with only tensors, containers and the allow-listed classes."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def verify_checkpoint(folder: str | os.PathLike) -> TrainerState:
    """Read every state file of a checkpoint without applying it; CheckpointError when one is damaged.

    Run before DeepSpeed loads anything, so a truncated file is found while the engine is still
    untouched and the previous checkpoint can be used instead.
    """
    folder = Path(folder)
    state_file = folder / TRAINER_STATE
    try:
        state = TrainerState(**json.loads(state_file.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} has no {TRAINER_STATE}") from None
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {folder}: {TRAINER_STATE} is damaged ({err})") from None
    files = sorted((folder / DEEPSPEED_DIR / DEEPSPEED_TAG).glob("*.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {folder} holds no DeepSpeed state under {DEEPSPEED_DIR}/{DEEPSPEED_TAG}/")
    for path in files:
        try:
            safe_load(path, map_location="cpu")
        except Exception as err:  # truncated zip, foreign pickle: all mean "do not use this one"
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"checkpoint {folder}: {path.name} cannot be read ({first_line})") from None
    return state


@contextlib.contextmanager
def weights_only_loading(engine):
    """Make DeepSpeed read its state files with `torch.load(weights_only=True)` and the allow-list above.

    DeepSpeed's checkpoint engine would otherwise unpickle arbitrary objects from a run folder.
    """
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.load
    checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location)
    try:
        yield
    finally:
        checkpoint_engine.load = original
