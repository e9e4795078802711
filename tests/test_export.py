"""`mttl export`: each format loaded back with peft / transformers gives our logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

peft = pytest.importorskip("peft")

from mttl.adapters import adapted_layers, save_adapters, selectors  # noqa: E402
from mttl.cli import main  # noqa: E402
from mttl.config import Config  # noqa: E402
from mttl.models.backbone import load_backbone  # noqa: E402
from mttl.models.run import build_routed_model  # noqa: E402
from mttl.models.tokenizer import load_tokenizer  # noqa: E402

TASKS = {"alpha": 0, "beta": 1, "gamma": 2}


def make_run(folder, **keys):
    cfg = Config()
    cfg.update({"model": "tiny-t5", "tokenizer": "byte", "tiny_d_model": 64, "seed": 0, "n_tasks": 3,
                "model_modifier": "poly", "lora_rank": 2, "lora_alpha": 3.0, "n_skills": 4, "n_splits": 4,
                "trainable_param_names": ".*lora_[ab].*|.*module_logits.*", **keys})
    tokenizer = load_tokenizer("byte")
    model = build_routed_model(cfg, tokenizer).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for name in layer.adapter_tensor_names:
                getattr(layer, name).normal_(0, 0.3)
        for selector in selectors(model).values():
            if hasattr(selector, "module_logits"):
                selector.module_logits.normal_(0, 2.0)
    cfg.save(folder)
    (folder / "tasks.json").write_text(json.dumps(TASKS))
    save_adapters(model, folder / "final")
    return model, len(tokenizer)


def batch(vocab, n=3):
    torch.manual_seed(3)
    return dict(input_ids=torch.randint(3, vocab, (n, 7)), decoder_input_ids=torch.randint(3, vocab, (n, 4)))


def base(vocab):
    return load_backbone("tiny-t5", vocab_size=vocab, tiny_d_model=64, seed=0)


def test_peft_poly_export_gives_our_logits_for_mixed_tasks(tmp_path):
    ours, vocab = make_run(tmp_path / "run", router_granularity="blockwise")
    assert main(["export", str(tmp_path / "run"), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    theirs = peft.PeftModel.from_pretrained(base(vocab), str(tmp_path / "peft")).eval()
    ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        expected = ours(task_ids=ids, **batch(vocab)).logits
        got = theirs(task_ids=ids, **batch(vocab)).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert json.loads((tmp_path / "peft" / "tasks.json").read_text()) == TASKS
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-t5"


@pytest.mark.parametrize("task", ["beta", "2"])
def test_peft_lora_export_gives_our_logits_for_the_task(tmp_path, task):
    ours, vocab = make_run(tmp_path / "run")
    out = tmp_path / "lora"
    assert main(["export", str(tmp_path / "run" / "final"), "--format", "peft-lora", "--task", task,
                 "--out", str(out)]) == 0
    task_id = TASKS[task] if task in TASKS else int(task)
    theirs = peft.PeftModel.from_pretrained(base(vocab), str(out)).eval()
    with torch.no_grad():
        expected = ours(task_ids=torch.tensor([task_id] * 3), **batch(vocab)).logits
        got = theirs(**batch(vocab)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("modifier", ["poly", "poly_ia3"])
def test_merged_export_gives_our_logits_for_the_task(tmp_path, modifier):
    ours, vocab = make_run(tmp_path / "run", model_modifier=modifier)
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run"), "--format", "merged", "--task", "gamma", "--out", str(out)]) == 0
    merged = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        expected = ours(task_ids=torch.tensor([2, 2, 2]), **batch(vocab)).logits
        got = merged(**batch(vocab)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (out / "tokenizer_config.json").is_file()


def test_export_errors_are_one_line(tmp_path, capsys):
    make_run(tmp_path / "run")
    (tmp_path / "taken").mkdir()
    assert main(["export", str(tmp_path / "run"), "--format", "merged", "--task", "delta",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--task 'delta' is neither a task of this run" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--format", "merged", "--out", str(tmp_path / "x")]) == 2
    assert "give --task" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--format", "peft", "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "taken"]
