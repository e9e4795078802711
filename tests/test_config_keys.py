"""Every configuration key acts or goes, and the shipped configs hold the reference's values.

- Each `Config` field must be read by some code path (an AST scan of the package and the job
  entry points); a key nothing reads would let a user set it with no effect.
- The reference's data-shaping keys are `mttl prepare` options, refused in run configs.
- `freeze_embeds` and `checkpoint_dir` act.
- Every value in `mttl/configs/**` is pinned here, with its source: a section of REFERENCE.md
  (../shared/REFERENCE.md, the reference's configs and scripts), or "ours" for the keys the
  reference has no counterpart for (Ray workers, failures, run names, the synthetic suite).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from mttl.cli import main
from mttl.config import PREPARE_ONLY_KEYS, Config, load_config
from mttl.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _read_fields() -> set[str]:
    """Config fields some code reads: `x.field` (not on an argparse `args`, whose flags may share a
    key's name) anywhere, or the key as a string outside config.py (getattr over key lists)."""
    fields = set(Config.field_names())
    read = set()
    files = [*(REPO / "mttl").rglob("*.py"), *(REPO / "jobs").glob("*.py"), *(REPO / "tune_spaces").glob("*.py")]
    for path in files:
        in_config = path == REPO / "mttl" / "config.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (isinstance(node, ast.Attribute) and node.attr in fields and isinstance(node.ctx, ast.Load)
                    and not (isinstance(node.value, ast.Name) and node.value.id == "args")):
                read.add(node.attr)
            elif (not in_config and isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and node.value in fields):
                read.add(node.value)
    return read


def test_every_config_key_is_read_by_some_code_path():
    unread = sorted(set(Config.field_names()) - _read_fields())
    assert not unread, f"config keys nothing reads (implement, make them prepare options, or remove): {unread}"


@pytest.mark.parametrize("key", sorted(PREPARE_ONLY_KEYS))
def test_data_shaping_keys_are_refused_naming_the_prepare_option(key, capsys):
    with pytest.raises(ConfigError, match=rf"'{key}' .*mttl prepare (ni|t0|xfit) --"):
        load_config(None, [f"{key}=1"])
    assert main(["configs", "-k", f"{key}=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and "mttl prepare" in err[0]


def test_run_folders_saved_with_data_shaping_keys_still_load(tmp_path):
    saved = Config().to_dict() | {"use_task_descriptions": True, "num_pos_examples": 2, "storycloze_dir": None,
                                  "max_instances_per_task": 100, "use_t0_templates_as_tasks": True,
                                  "use_t0_few_shot_training_set": False, "_overridden": ["use_task_descriptions"]}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert Config.load(tmp_path / "config.json").to_dict() == Config().to_dict()


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_embeds_keeps_the_token_embeddings_frozen(freeze):
    from mttl.models.run import build_routed_model
    from mttl.models.tokenizer import load_tokenizer

    cfg = Config().update({"model": "tiny-t5", "tokenizer": "byte", "tiny_d_model": 32, "tiny_num_layers": 1,
                           "model_modifier": None, "trainable_param_names": ".*", "freeze_embeds": freeze})
    model = build_routed_model(cfg, load_tokenizer("byte"))
    hf = model.hf_model
    embedding = hf.get_input_embeddings().weight
    assert embedding.requires_grad is not freeze
    assert hf.encoder.embed_tokens.weight.requires_grad is not freeze  # tied to the shared table
    others = [p for n, p in hf.named_parameters() if p is not embedding]
    assert others and all(p.requires_grad for p in others)


def test_freeze_embeds_holds_in_full_fine_tuning(tmp_path):
    from mttl.finetune.types import load_for_finetuning
    from test_continuation import handmade_run

    run = handmade_run(tmp_path, tmp_path / "data")
    for freeze in (False, True):
        model = load_for_finetuning(Config().update({"checkpoint": str(run), "finetune_type": "F",
                                                     "freeze_embeds": freeze})).model
        embedding = model.hf_model.get_input_embeddings().weight
        assert embedding.requires_grad is not freeze
        # everything else trains (F), the routing row and the decoder's blocks included
        assert all(p.requires_grad for p in model.parameters() if p is not embedding)


# ------------------------------------------------------------------------------------ shipped configs
TRAINABLE = ".*lora_[ab].*|.*module_logits.*"  # REFERENCE.md §3.3 trainable_param_names (T0 and NI)
MODULES = ".*SelfAttention|.*EncDecAttention|.*DenseReluDense"  # §2.1 / §3.3 lora_modules

PINNED = {
    "ni/pretrain.json": {
        "dataset": "ni",  # §3.3 NI pre-train
        "model": "google/t5-large-lm-adapt",  # §3.3 model: t5-large-lm-adapt
        "optimizer": "adamw",  # §3.3
        "learning_rate": 5e-5,  # §3.3 (the "others" group)
        "adapters_learning_rate": 1e-3,  # §3.3
        "module_logits_learning_rate": 0.1,  # §3.3
        "weight_decay": 0.01,  # §3.3 weight_decay / max_grad_norm 0.01 / 0.1
        "max_grad_norm": 0.1,  # §3.3
        "warmup_steps": 1500,  # §3.3 warmup_steps=1500
        "total_steps": 25000,  # §3.3
        "train_batch_size": 64,  # §3.3 batch 8 per GPU (DDP on all GPUs) × 8 workers: the global batch here
        "predict_batch_size": 24,  # §3.3 train / predict batch 8 / 24
        "precision": "bf16",  # §3.3 bf16
        "use_gpu": True,  # ours: Ray Train workers (the reference used every GPU of the node)
        "num_workers": 8,  # ours: 8 GPU workers, the global batch above
        "zero_stage": 0,  # §5.1 compute_strategy ddp = ZeRO stage 0
        "max_input_length": 1024,  # §3.3 max_input / max_output len 1024 / 128
        "max_output_length": 128,  # §3.3
        "eval_every": 5000,  # §3.3 eval_every / save_every 5,000
        "save_every": 5000,  # §3.3
        "max_failures": 3,  # ours: Ray Train restarts from the last checkpoint
        "modify_modules": MODULES,
        "trainable_param_names": TRAINABLE,
        "label_smoothing": 0.1,  # §5.2 NI loss: label-smoothed NLL, ε = 0.1
    },
    "ni/poly.json": {
        "model_modifier": "poly",  # §2.9 Poly = poly_lora
        "lora_rank": 16,  # §3.3 lora_rank 16 (poly_lora.json)
        "n_skills": 8,  # §3.3 n_skills / n_splits 8 / 1
        "n_splits": 1,  # §3.3
        "modify_layers": "q|k|v|o",  # §3.3 lora_layers q|k|v|o (poly_lora.json)
        "run_name": "ni_poly",  # ours
    },
    "ni/mhr.json": {
        "model_modifier": "poly",  # §2.9 MHR = poly_lora with S > 1
        "lora_rank": 16,  # §3.3 as ni/poly_lora.json
        "n_skills": 8,  # §3.3
        "n_splits": 8,  # ours: the reference ships no NI MHR config (§3.3 has S = 1); docs/reproduce.md says so
        "modify_layers": "q|k|v|o",  # §3.3
        "run_name": "ni_mhr",  # ours
    },
    "ni/ia3.json": {
        "model_modifier": "ia3",  # §2.3 (IA)³
        "modify_modules": MODULES,
        "modify_layers": "k|v|wi_1.*",  # §2.3 applied to k, v and wi_1 (T-Few recipe)
        "trainable_param_names": ".*lora_b.*",  # §2.3 trainable regex .*lora_b.*
    },
    "t0/pretrain.json": {
        "dataset": "t0",  # §3.3 T0 pre-train
        "model": "google/t5-xl-lm-adapt",  # §3.3
        "optimizer": "adafactor",  # §3.3 adafactor (adafactor_scale_parameter=false)
        "adafactor_scale_parameter": False,  # §3.3
        "learning_rate": 3e-4,  # §3.3 (others)
        "adapters_learning_rate": 1e-3,  # §3.3
        "module_logits_learning_rate": 0.1,  # §3.3
        "weight_decay": 0.0,  # §3.3 weight_decay / max_grad_norm 0 / 1
        "max_grad_norm": 1.0,  # §3.3
        "warmup_proportion": 0.06,  # §3.3 warmup 6% of total_steps
        "total_steps": 100000,  # §3.3
        "train_batch_size": 128,  # §3.3 batch 8 per GPU, grad-accum 2, DDP × 8 workers: the global batch here
        "gradient_accumulation_steps": 2,  # §3.3
        "predict_batch_size": 8,  # §3.3 train / predict batch 8 / 8
        "precision": "bf16",  # §3.3 bf16
        "use_gpu": True,  # ours
        "num_workers": 8,  # ours
        "zero_stage": 0,  # §3.3 DDP = ZeRO stage 0
        "max_input_length": 256,  # §3.3 max_input / max_output len 256 / 256
        "max_output_length": 256,  # §3.3
        "eval_every": 20000,  # §3.3 eval_every 20,000 in the scripts
        "save_every": 5000,  # differs: §3.3 saves every 50,000; ours loses at most 5,000 steps to a preemption
        "max_failures": 3,  # ours
        "modify_modules": MODULES,
        "modify_layers": "q|k|v|o|wi_1.*|wi_0.*|wo",  # §3.3 lora_layers
        "trainable_param_names": TRAINABLE,
        "module_logits_relaxed_bernoulli": False,  # §3.3 other: module_logits_relaxed_bernoulli=false
    },
    "t0/poly.json": {"model_modifier": "poly", "lora_rank": 1, "n_skills": 8, "n_splits": 1,  # §3.3 K=8, S=1, r=1
                     "run_name": "t0_poly"},  # ours
    "t0/mhr.json": {"model_modifier": "poly", "lora_rank": 1, "n_skills": 8, "n_splits": 64,  # §3.3 S=64 (MHR)
                    "run_name": "t0_mhr"},  # ours
    "t0/lora.json": {"model_modifier": "poly", "lora_rank": 1, "n_skills": 1, "n_splits": 1,  # §2.9 LoRA: K=1
                     "run_name": "t0_lora"},  # ours
    "t0/ia3.json": {"model_modifier": "ia3", "modify_modules": MODULES,  # §2.3
                    "modify_layers": "k|v|wi_1.*", "trainable_param_names": ".*lora_b.*"},  # §2.3
    "t0/finetune.json": {
        "dataset": "t0",  # §3.3 T0 few-shot
        "optimizer": "adafactor",  # §3.3 adafactor (scale_parameter back to its default true)
        "warmup_proportion": 0.06,  # §3.3 warmup 6%
        "total_steps": 1000,  # §3.3 total_steps 1,000
        "learning_rate": 3e-3,  # §3.3 learning_rate 3e-3
        "max_grad_norm": 1.0,  # §3.3 weight_decay / max_grad_norm 0 / 1
        "weight_decay": 0.0,  # §3.3
        "precision": "bf16",  # §3.4 t0/xl-lm-adapt.json: bf16
    },
    "synthetic/pretrain.json": {  # ours: the synthetic suite has no reference counterpart
        "dataset": "synthetic", "model_modifier": "poly", "n_skills": 4, "lora_rank": 4, "tokenizer": "byte",
        "max_input_length": 32, "max_output_length": 32, "train_batch_size": 32, "num_workers": 2,
        "zero_stage": 2, "total_steps": 1000, "eval_every": 250, "save_every": 250, "log_every": 50,
        "max_failures": 2, "run_name": "synthetic_poly",
    },
}
# §3.3 T0 few-shot task configs: batch 8 / predict 16 (h-swag 4 × 2 accumulation steps, written as the
# global batch 8 here), and the T-Few losses length_norm = mc_loss = unlikely_loss = 1
for _task in ("anli-r1", "anli-r2", "anli-r3", "cb", "copa", "h-swag", "rte", "storycloze", "wic", "winogrande",
              "wsc"):
    PINNED[f"t0/{_task}.json"] = {
        "dataset": "t0", "finetune_task_name": _task, "train_batch_size": 8, "predict_batch_size": 16,
        "gradient_accumulation_steps": 2 if _task == "h-swag" else 1,
        "length_norm": 1.0, "mc_loss": 1.0, "unlikely_loss": 1.0,
    }


def test_shipped_configs_hold_the_reference_values():
    root = REPO / "mttl" / "configs"
    shipped = {path.relative_to(root).as_posix(): path for path in root.rglob("*.json")}
    assert sorted(shipped) == sorted(PINNED), "pin every shipped config here, with the source of each value"
    for name, path in shipped.items():
        values = json.loads(path.read_text())
        assert values == PINNED[name], name
        load_config(str(path))  # and every key is one a run config accepts
