"""The device and precision policy (`mttl.device`) as every command applies it.

On this CPU-only machine: `use_gpu=auto` resolves to the CPU; `use_gpu=True` is a one-line error
from finetune, evaluate, sweep and pretrain before anything is written or Ray starts; precision=bf16
fine-tunes with finite losses and scores rank classification with the fp32 run's choices. A test
marked `gpu` runs fine-tuning and evaluation on a CUDA device in bf16 where there is one.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mttl import device
from mttl.adapters import ops
from mttl.cli import main
from mttl.config import Config, load_config
from mttl.data.fewshot import eval_rows
from mttl.errors import ConfigError
from mttl.evaluation.predict import choice_token_logprobs, encode_choice_batch, generate, rank_classification
from mttl.models.run import load_run
from test_finetune import make_checkpoint, t0_cb_subset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAS_CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="checks what happens on a machine without a GPU")
# what `mttl evaluate` uses for the checkpoint below: its max_input_length/max_output_length, T0's length_norm
SCORING = dict(length_norm=1.0, max_input_length=64, max_output_length=24, batch_size=8)
SCORING_KEYS = ["length_norm=1", "max_input_length=64", "max_output_length=24", "predict_batch_size=8",
                "tensorboard=False"]


@pytest.fixture(scope="module")
def cb_run(tmp_path_factory):
    """A routed tiny-T5 run folder whose data is T0's CB (multiple choice, rank classification)."""
    root = tmp_path_factory.mktemp("precision")
    data = t0_cb_subset(root)
    return make_checkpoint(root, data, "poly", dataset="t0"), data


@cpu_only
def test_auto_resolves_to_the_cpu_and_checks_its_keys():
    cfg = Config()
    assert cfg.use_gpu == "auto" and device.requested_gpu(cfg) is None
    assert device.resolve_device(cfg) == torch.device("cpu") and not device.uses_gpu(cfg)
    assert device.backbone_dtype(cfg) == torch.float32
    assert device.backbone_dtype(cfg.copy(precision="bf16")) == torch.bfloat16  # auto follows precision
    assert device.backbone_dtype(cfg.copy(precision="16")) == torch.float32  # T5 overflows fp16: kept fp32
    with pytest.raises(ConfigError, match="backbone_dtype=bf16 needs precision=bf16"):
        device.backbone_dtype(cfg.copy(backbone_dtype="bf16"))
    fp32_backbone = cfg.copy(precision="bf16", backbone_dtype="32")
    device.check_before_ray(fp32_backbone)  # finetune, evaluate, sweeps keep an fp32 backbone under bf16 autocast
    with pytest.raises(ConfigError, match="backbone_dtype=32 cannot hold in pre-training"):
        device.check_before_ray(fp32_backbone, deepspeed=True)  # DeepSpeed's bf16 mode would cast it anyway
    with pytest.raises(ConfigError, match="precision=16 needs a GPU"):
        device.Precision(torch.device("cpu"), "16")
    with pytest.raises(ConfigError, match="use_gpu=True but this machine has no GPU"):
        device.resolve_device(cfg.copy(use_gpu=True))
    assert load_config(None, ["use_gpu=False"]).use_gpu is False
    assert load_config(None, ["use_gpu=auto"]).use_gpu == "auto"


@cpu_only
@pytest.mark.parametrize("command", ["finetune", "evaluate", "sweep", "pretrain"])
def test_use_gpu_true_without_a_gpu_is_one_line_before_anything_runs(command, tmp_path, capsys):
    import sys

    def ray_up() -> bool:
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    out, cache = tmp_path / "out", tmp_path / "cache"
    ray_before = ray_up()  # another test of the session may have started one
    code = main([command, "-k", "use_gpu=True", "finetune_task_name=cb", f"output_dir={out}", f"cache_dir={cache}"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("mttl: error: use_gpu=True but this machine has no GPU") and "use_gpu=False" in err
    assert not out.exists() and not cache.exists()  # nothing prepared, nothing written
    assert ray_up() == ray_before  # no Ray started


@cpu_only
def test_a_cluster_without_gpus_runs_auto_on_cpus_and_refuses_true(ray_cluster):
    """Against Ray's own view: the cluster's GPU resources for drivers, the task's assignment inside tasks."""
    from mttl.sweep import trial_resources

    ray = ray_cluster
    assert device.cluster_uses_gpu(Config()) is False
    assert trial_resources(Config()) == {"CPU": 1}
    assert trial_resources(Config().copy(trial_resources={"CPU": 2})) == {"CPU": 2}
    with pytest.raises(ConfigError, match="use_gpu=True but the Ray cluster has no GPU resources"):
        trial_resources(Config().copy(use_gpu=True, trial_resources={"CPU": 1, "GPU": 1}))

    @ray.remote(num_cpus=0.1)
    def resolve(use_gpu):
        from mttl import device
        from mttl.config import Config
        from mttl.errors import ConfigError

        try:
            return device.in_ray_worker(), str(device.resolve_device(Config().copy(use_gpu=use_gpu)))
        except ConfigError as err:
            return device.in_ray_worker(), str(err)

    assert ray.get(resolve.remote("auto")) == (True, "cpu")
    inside, message = ray.get(resolve.remote(True))
    assert inside and message.startswith("use_gpu=True but Ray gave this task no GPU")
    assert not device.in_ray_worker()  # this process is the driver


def _dtypes(model) -> dict[str, set]:
    """dtypes of the trained, the adapter/routing and the frozen backbone parameters."""
    adapters = device.adapter_tensor_ids(model)
    out = {"trained": set(), "adapters": set(), "frozen_backbone": set()}
    for p in model.parameters():
        key = "trained" if p.requires_grad else "adapters" if id(p) in adapters else "frozen_backbone"
        out[key].add(p.dtype)
    return out


def test_bf16_rank_classification_keeps_the_fp32_choices(cb_run, tmp_path):
    """`mttl evaluate precision=bf16` holds the frozen backbone in bf16, scores under autocast, and
    picks the fp32 run's choice on >= 95 % of the rows."""
    checkpoint, data = cb_run
    rows = eval_rows(data, "cb", "test")
    reference = load_run(checkpoint)  # fp32, as before this policy existed
    ops.switch_to_average(reference.model)  # cb is not one of the run's tasks: average routing, as evaluate
    want = rank_classification(reference.model, reference.tokenizer, rows, 0, **SCORING)

    half = load_run(checkpoint, backbone_dtype=torch.bfloat16)
    ops.switch_to_average(half.model)
    dtypes = _dtypes(half.model)
    assert dtypes["frozen_backbone"] == {torch.bfloat16} and dtypes["adapters"] <= {torch.float32}
    got = rank_classification(half.model, half.tokenizer, rows, 0, precision="bf16", **SCORING)
    agree = sum(a == b for a, b in zip(got["predictions"], want["predictions"])) / len(rows)
    assert agree >= 0.95, (agree, got["predictions"], want["predictions"])

    # it really computed in bf16: the choice log-probabilities differ from fp32's, by bf16's rounding
    batch = encode_choice_batch(half.tokenizer, rows[:8], 64, 24)
    ids = torch.zeros(8, dtype=torch.long)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lp_half = choice_token_logprobs(half.model, ids, batch["input_ids"], batch["attention_mask"],
                                        batch["choice_labels"])
    with torch.no_grad():
        lp_ref = choice_token_logprobs(reference.model, ids, batch["input_ids"], batch["attention_mask"],
                                       batch["choice_labels"])
    gap = (lp_half - lp_ref).abs().max().item()
    assert 0 < gap < 0.5

    # beam search runs under the same policy (the untrained model's outputs are mostly empty, so only
    # that it runs with a bf16 backbone is checked here)
    beams = generate(half.model, half.tokenizer, rows[:8], 0, precision="bf16", num_beams=2, max_input_length=64,
                     max_output_length=6, batch_size=4)
    assert len(beams) == 8 and all(isinstance(b, str) for b in beams)

    assert main(["evaluate", "-k", f"checkpoint={checkpoint}", "tasks=['cb']", "precision=bf16",
                 f"output_dir={tmp_path}", "run_name=ev_bf16", *SCORING_KEYS]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "ev_bf16" / "results.jsonl").read_text().splitlines()]
    assert row["metric"] == "accuracy" and row["value"] == pytest.approx(got["accuracy"])


def test_bf16_finetune_on_cpu_trains_fp32_weights_with_finite_losses(cb_run, tmp_path):
    checkpoint, _ = cb_run
    assert main(["finetune", "-k", f"checkpoint={checkpoint}", "finetune_task_name=cb", "precision=bf16",
                 f"output_dir={tmp_path}", "run_name=ft_bf16", "seeds=[42]", "total_steps=4", "train_batch_size=4",
                 "eval_every_epochs=1", "num_shots=8", "log_every=1", "mc_loss=1", "unlikely_loss=1",
                 *SCORING_KEYS]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "ft_bf16" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 4 and all(math.isfinite(v) and v > 0 for v in losses)
    results = [json.loads(line) for line in (tmp_path / "ft_bf16" / "results.jsonl").read_text().splitlines()]
    assert [r["evaluation"] for r in results] == ["zero_shot", "best_val", "test"]
    assert all(0 <= r["value"] <= 100 for r in results)

    from mttl.finetune.types import load_for_finetuning

    ft = load_for_finetuning(load_config(None, {"checkpoint": str(checkpoint), "finetune_task_name": "cb",
                                                "precision": "bf16"}))
    dtypes = _dtypes(ft.model)
    assert dtypes["trained"] == {torch.float32} and dtypes["frozen_backbone"] == {torch.bfloat16}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_finetune_and_evaluate_on_the_gpu_in_bf16(cb_run, tmp_path):
    from mttl.finetune.types import load_for_finetuning

    checkpoint, data = cb_run
    cfg = load_config(None, {"checkpoint": str(checkpoint), "finetune_task_name": "cb", "precision": "bf16",
                             "use_gpu": True})
    ft = load_for_finetuning(cfg)
    assert {p.device.type for p in ft.model.parameters()} == {"cuda"}
    assert _dtypes(ft.model)["trained"] == {torch.float32}
    assert main(["finetune", "-k", f"checkpoint={checkpoint}", "finetune_task_name=cb", "precision=bf16",
                 "use_gpu=True", f"output_dir={tmp_path}", "run_name=ft_gpu", "seeds=[42]", "total_steps=4",
                 "train_batch_size=4", "eval_every_epochs=1", "num_shots=8", "log_every=1", "mc_loss=1",
                 "unlikely_loss=1", *SCORING_KEYS]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "ft_gpu" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["train/loss"]) for m in metrics if "train/loss" in m)

    rows = eval_rows(data, "cb", "test")
    reference = load_run(checkpoint)
    ops.switch_to_average(reference.model)
    want = rank_classification(reference.model, reference.tokenizer, rows, 0, **SCORING)
    gpu = load_run(checkpoint, backbone_dtype=torch.bfloat16)
    ops.switch_to_average(gpu.model)
    device.place_model(gpu.model, torch.device("cuda"))
    got = rank_classification(gpu.model, gpu.tokenizer, rows, 0, precision="bf16", **SCORING)
    assert sum(a == b for a, b in zip(got["predictions"], want["predictions"])) / len(rows) >= 0.95
    assert main(["evaluate", "-k", f"checkpoint={checkpoint}", "tasks=['cb']", "precision=bf16", "use_gpu=True",
                 f"output_dir={tmp_path}", "run_name=ev_gpu", *SCORING_KEYS]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "ev_gpu" / "results.jsonl").read_text().splitlines()]
    assert row["value"] == pytest.approx(got["accuracy"])


def test_a_backbone_saved_in_bf16_gets_fp32_adapters_and_a_policy_dtype(tmp_path):
    """Files saved in bf16 load as fp32 (transformers would keep bf16, and adapters take their layer's
    dtype); the frozen weights are then held in the dtype the policy gives, the adapters stay fp32."""
    import transformers

    from mttl.models.backbone import tiny_t5_config
    from mttl.models.run import build_routed_model
    from mttl.models.tokenizer import load_tokenizer

    transformers.T5ForConditionalGeneration(tiny_t5_config(384, 64, 2)).to(torch.bfloat16).save_pretrained(tmp_path)
    cfg = load_config(None, {"model": str(tmp_path), "tokenizer": "byte", "model_modifier": "poly", "n_tasks": 2,
                             "n_skills": 2, "lora_rank": 2, "trainable_param_names": ".*lora_[ab].*|.*module_logits.*"})
    fp32 = _dtypes(build_routed_model(cfg, load_tokenizer("byte")))
    assert fp32["frozen_backbone"] == {torch.float32} and fp32["trained"] == {torch.float32}
    half = _dtypes(build_routed_model(cfg, load_tokenizer("byte"), dtype=torch.bfloat16))
    assert half["frozen_backbone"] == {torch.bfloat16} and half["trained"] == {torch.float32}
