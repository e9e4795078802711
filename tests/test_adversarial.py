"""Bad input through the real CLI, one table row each: one error line, a non-zero exit, nothing written.

Every row sets up one bad input in a fresh folder that is also the working folder, runs
`mttl ARGV` in-process and checks the contract of mttl/errors.py: the exit code (2 for an
MttlError or a usage mistake, 1 for `mttl prepare check` finding damage), stderr exactly one
line holding the row's fragment and no traceback, and every file and folder under the working
folder exactly as before (no output folder, no config.json, no `*.tmp-*` staging left behind).
No row starts Ray or trains: each fails in the checks that run before either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_ni import write_ni_repo

from mttl.cli import main
from mttl.config import Config, load_config
from mttl.data import shards
from mttl.report import REPORT_MARKER


# ------------------------------------------------------------------------------------ setups
# Each takes the working folder and writes the bad input into it.
def write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(t: Path) -> None:
        path = t / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
    return setup


def steps(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(t: Path) -> None:
        for one in setups:
            one(t)
    return setup


def prepared(t: Path) -> None:
    """`data/`: a small prepared folder, two tasks, several shards."""
    rows = [{"task_name": task, "split": split, "source": f"{task} {i}", "target": f"out {i}"}
            for task in ("alpha", "beta") for split in ("train", "validation") for i in range(4)]
    shards.write_prepared(t / "data", rows, {"alpha": {"role": "train"}, "beta": {"role": "train"}},
                          source="test", args={}, rows_per_file=4)


def first_shard(t: Path) -> Path:
    return t / "data" / json.loads((t / "data" / shards.MANIFEST).read_text())["files"][0]["path"]


def damaged(kind: str) -> Callable[[Path], None]:
    """`data/` with its first shard changed: other rows (valid Parquet), truncated, garbage or gone."""
    def setup(t: Path) -> None:
        prepared(t)
        shard = first_shard(t)
        if kind == "changed":
            table = pq.read_table(shard)
            table = table.set_column(table.schema.get_field_index("target"), "target",
                                     pa.array(["edited"] * table.num_rows, pa.string()))
            pq.write_table(table.cast(shards.SCHEMA), shard)
        elif kind == "truncated":
            shard.write_bytes(shard.read_bytes()[:200])
        elif kind == "garbage":
            shard.write_bytes(b"not parquet at all\n" * 50)
        else:
            shard.unlink()
    return setup


def manifest_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(t: Path) -> None:
        prepared(t)
        path = t / "data" / shards.MANIFEST
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
    return setup


def first_file(value) -> Callable[[dict], None]:
    """A manifest edit: its first `files` entry becomes `value`."""
    return lambda manifest: manifest["files"].__setitem__(0, value)


def ni_repo(edit: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """`ni/`: a tiny natural-instructions checkout (tests/test_ni.py), then `edit(ni)`."""
    def setup(t: Path) -> None:
        write_ni_repo(t / "ni")
        if edit is not None:
            edit(t / "ni")
    return setup


def ni_task(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(repo: Path) -> None:
        path = repo / "tasks" / f"{name}.json"
        task = json.loads(path.read_text())
        change(task)
        path.write_text(json.dumps(task))
    return ni_repo(edit)


def fake_run(tasks_json: str | bytes | None = '{"alpha": 0}', final: bool = True) -> Callable[[Path], None]:
    """`run/`: what a finished run folder holds before any weights are read (config.json, tasks.json, final/)."""
    def setup(t: Path) -> None:
        Config().update({"model": "tiny-t5", "tokenizer": "byte", "model_modifier": "poly"}).save(t / "run")
        if final:
            (t / "run" / "final").mkdir()
        if tasks_json is not None:
            write("run/tasks.json", tasks_json)(t)
    return setup


def t0_source(templates_yaml: str) -> Callable[[Path], None]:
    """`t0/`: one raw training dataset `toy` and its promptsource templates."""
    return steps(write("t0/src/toy/train.jsonl", '{"text": "hello"}\n'),
                 write("t0/templates/toy/templates.yaml", templates_yaml))


def template(jinja: str) -> str:
    return ("dataset: toy\ntemplates:\n  id-1: !Template\n    id: id-1\n    name: evil\n"
            f"    jinja: '{jinja} ||| x'\n    metadata: !TemplateMetadata\n      original_task: true\n")


def finetune_results(t: Path) -> None:
    """`ft/`: a fine-tuning run with one result row."""
    write("ft/results.jsonl", json.dumps({"task": "alpha", "seed": 13, "evaluation": "test", "metric": "exact_match",
                                          "value": 50.0, "finetune_type": "Z"}) + "\n")(t)


def previous_report(files: list[str]) -> Callable[[Path], None]:
    """`rep/`: a folder whose marker says the report wrote `files`."""
    return steps(write("rep/report.md", "# Report\n"),
                 write(f"rep/{REPORT_MARKER}", json.dumps({"files": files})))


# ------------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]
    expect: str  # a fragment of the one error line
    setup: Callable[[Path], None] | None = None
    code: int = 2
    absent: tuple[str, ...] = ("output",)  # paths (from the working folder) that must not appear


PRETRAIN = ("pretrain", "-k", "model=tiny-t5", "tokenizer=byte", "run_name=r", "total_steps=2")
ON_DATA = (*PRETRAIN, "data_dir=data")
NI = ("prepare", "ni", "--source", "ni", "--out", "shards")
T0 = ("prepare", "t0", "--source", "t0/src", "--templates", "t0/templates", "--out", "shards")


def k(*pairs: str) -> tuple[str, ...]:
    return (*PRETRAIN, *pairs)


ROWS = [
    # ---- config files (-c)
    Row("config-binary", ("pretrain", "-c", "bin.json"), "is not a text file", write("bin.json", bytes(range(256)))),
    Row("config-bad-json", ("pretrain", "-c", "mine.json"), "not valid JSON (line 1", write("mine.json", '{"a": 1,}')),
    Row("config-not-object", ("pretrain", "-c", "list.json"), "must hold a JSON object", write("list.json", "[1, 2]")),
    Row("config-missing", ("pretrain", "-c", "nope.json"), "config file 'nope.json' not found"),
    Row("config-unknown-key", ("pretrain", "-c", "typo.json"), "did you mean 'learning_rate'",
        write("typo.json", '{"learning_rat": 0.1}')),
    Row("config-bool-for-int", ("pretrain", "-c", "b.json"), "'n_skills' (from b.json) must be int",
        write("b.json", '{"n_skills": true}')),
    Row("config-is-a-folder", ("pretrain", "-c", "cfgdir.json"), "not found",
        lambda t: (t / "cfgdir.json").mkdir()),
    # ---- -k syntax, names, types, choices
    Row("k-unknown-key", k("lerning_rate=1e-3"), "did you mean 'learning_rate'"),
    Row("k-no-equals", k("learning_rate"), "-k expects key=value"),
    Row("k-unset-variable", k("output_dir=$MTTL_TEST_UNSET_VAR/runs"), "uses $MTTL_TEST_UNSET_VAR, which is not set"),
    Row("k-bad-dollar", k("cache_dir=cache$"), "bad $-expression"),
    Row("k-bad-choice", k("model_modifier=polly"), "did you mean 'poly'"),
    Row("k-bad-zero-stage", k("zero_stage=5"), "must be one of [0, 1, 2, 3]"),
    Row("k-bad-bool", k("use_gpu=maybe"), "'use_gpu' (from -k) must be auto, True or False"),
    Row("k-dict-expected", k("resources_per_worker=4"), "'resources_per_worker' (from -k) must be dict"),
    Row("k-word-for-int", k("n_skills=many"), "'n_skills' (from -k) must be int"),
    Row("k-bool-for-int", k("n_skills=True"), "'n_skills' (from -k) must be int"),
    Row("k-fraction-for-int", k("lora_rank=2.5"), "'lora_rank' (from -k) must be int"),
    Row("k-scalar-for-list", k("seeds=5"), "'seeds' (from -k) must be a list, got 5"),
    Row("k-words-for-seeds", k("seeds=['a']"), "must be a non-empty list of integers"),
    Row("k-numbers-for-tasks", k("tasks=[1, 2]"), "'tasks' (from -k) must be a list of names"),
    Row("k-compute-strategy", k("compute_strategy=fsdp"), "compute_strategy='fsdp' is not understood"),
    # ---- values out of range
    Row("num-workers-0", k("num_workers=0"), "'num_workers' (from -k) must be at least 1"),
    Row("train-batch-0", k("train_batch_size=0"), "'train_batch_size' (from -k) must be at least 1"),
    Row("predict-batch-0", k("predict_batch_size=0"), "'predict_batch_size' (from -k) must be at least 1"),
    Row("grad-accum-0", k("gradient_accumulation_steps=0"),
        "'gradient_accumulation_steps' (from -k) must be at least 1"),
    Row("lr-nan", k("learning_rate=nan"), "'learning_rate' (from -k) must be a finite number"),
    Row("lr-inf", k("learning_rate=1e400"), "'learning_rate' (from -k) must be a finite number"),
    Row("lr-negative", k("learning_rate=-1e-3"), "'learning_rate' (from -k) must be greater than 0"),
    Row("lr-zero", k("learning_rate=0"), "'learning_rate' (from -k) must be greater than 0"),
    Row("adapters-lr-negative", k("adapters_learning_rate=-1"),
        "'adapters_learning_rate' (from -k) must be at least 0"),
    Row("routing-lr-inf", k("module_logits_learning_rate=inf"),
        "'module_logits_learning_rate' (from -k) must be a finite"),
    Row("num-beams-0", k("num_beams=0"), "'num_beams' (from -k) must be at least 1"),
    Row("lora-rank-0", k("lora_rank=0"), "'lora_rank' (from -k) must be at least 1"),
    Row("n-splits-0", k("n_splits=0"), "'n_splits' (from -k) must be at least 1"),
    Row("total-steps-0", k("total_steps=0"), "must be at least 1 (or -1: from num_train_epochs)"),
    Row("max-grad-norm-negative", k("max_grad_norm=-0.5"), "'max_grad_norm' (from -k) must be at least 0"),
    Row("lora-dropout-1", k("lora_dropout=1.0"), "'lora_dropout' (from -k) must be in [0, 1)"),
    Row("routing-dropout-negative", k("module_logits_dropout=-0.1"),
        "'module_logits_dropout' (from -k) must be in [0, 1)"),
    Row("warmup-proportion-1.5", k("warmup_proportion=1.5"), "'warmup_proportion' (from -k) must be in [0, 1]"),
    Row("num-samples-0", ("sweep", "-k", "checkpoint=run", "num_samples=0"),
        "'num_samples' (from -k) must be at least 1"),
    Row("num-shots-0", ("finetune", "-k", "checkpoint=run", "num_shots=0"), "'num_shots' (from -k) must be at least 1"),
    # ---- run_name must stay inside output_dir
    Row("run-name-parent", k("run_name=../../x"), "'run_name' (from -k) must be a plain folder name"),
    Row("run-name-absolute", k("run_name=/tmp/mttl-abs-run"), "must be a plain folder name"),
    Row("run-name-nested", k("run_name=a/b"), "must be a plain folder name"),
    Row("run-name-dot", k("run_name=."), "must be a plain folder name"),
    Row("run-name-dotdot", k("run_name=.."), "must be a plain folder name"),
    Row("run-name-empty", k("run_name="), "must be a plain folder name"),
    # ---- pre-training data, checked before Ray starts
    Row("pretrain-no-manifest", (*PRETRAIN, "data_dir=nodata"), "manifest.json not found"),
    Row("pretrain-ni-without-data", k("dataset=ni"), "dataset=ni needs prepared shards"),
    Row("pretrain-shard-changed", ON_DATA, "sha256 differs from manifest.json", damaged("changed")),
    Row("pretrain-shard-changed-says-prepare", ON_DATA, "run `mttl prepare` again", damaged("changed")),
    Row("pretrain-shard-truncated", ON_DATA, "sha256 differs", damaged("truncated")),
    Row("pretrain-shard-garbage", ON_DATA, "sha256 differs", damaged("garbage")),
    Row("pretrain-shard-missing", ON_DATA, "missing, so the data no longer matches", damaged("missing")),
    Row("pretrain-unknown-task", (*ON_DATA, "tasks=['nope']"), "task(s) ['nope'] are not in the prepared data",
        prepared),
    Row("pretrain-missing-task-list", (*ON_DATA, "custom_tasks_splits=none.txt"), "custom_tasks_splits file", prepared),
    Row("pretrain-manifest-files-dict", ON_DATA, "'files' must be a list", manifest_edit(lambda m: m.update(files={}))),
    Row("pretrain-total-steps-unset", (*ON_DATA, "total_steps=-1"), "total_steps must be set", prepared),
    # ---- `mttl prepare check`
    Row("check-missing-folder", ("prepare", "check", "nodata"), "manifest.json not found", code=1),
    Row("check-shard-missing", ("prepare", "check", "data"), "missing (listed in manifest.json)",
        damaged("missing"), 1),
    Row("check-shard-truncated", ("prepare", "check", "data"), "unreadable Parquet", damaged("truncated"), 1),
    Row("check-shard-garbage", ("prepare", "check", "data"), "sha256 differs", damaged("garbage"), 1),
    Row("check-shard-changed", ("prepare", "check", "data"), "sha256 differs", damaged("changed"), 1),
    Row("check-manifest-not-json", ("prepare", "check", "data"), "is not valid JSON",
        steps(prepared, write("data/manifest.json", "{oops")), 1),
    Row("check-manifest-files-dict", ("prepare", "check", "data"), "'files' must be a list",
        manifest_edit(lambda m: m.update(files={"a": 1})), 1),
    Row("check-manifest-tasks-list", ("prepare", "check", "data"), "'tasks' must be an object",
        manifest_edit(lambda m: m.update(tasks=["alpha"])), 1),
    Row("check-manifest-no-tasks", ("prepare", "check", "data"), "lists no tasks",
        manifest_edit(lambda m: m.update(tasks={})), 1),
    Row("check-manifest-entry-without-path", ("prepare", "check", "data"), "files[0] lacks a 'path' string",
        manifest_edit(lambda m: m["files"][0].pop("path")), 1),
    Row("check-manifest-entry-not-object", ("prepare", "check", "data"), "files[0] lacks a 'path' string",
        manifest_edit(first_file("train/part-00000.parquet")), 1),
    Row("check-manifest-path-parent", ("prepare", "check", "data"), "points outside",
        manifest_edit(lambda m: m["files"][0].update(path="../elsewhere.parquet")), 1),
    Row("check-manifest-path-absolute", ("prepare", "check", "data"), "points outside",
        manifest_edit(lambda m: m["files"][0].update(path="/etc/passwd")), 1),
    Row("check-manifest-sha-missing", ("prepare", "check", "data"), "files[0] 'sha256' must be 64 hex digits",
        manifest_edit(lambda m: m["files"][0].pop("sha256")), 1),
    Row("check-manifest-rows-text", ("prepare", "check", "data"), "'rows' must be an integer",
        manifest_edit(lambda m: m["files"][0].update(rows="4")), 1),
    # ---- `mttl prepare ni`
    Row("ni-malformed-json", NI, "malformed JSON",
        ni_repo(lambda r: (r / "tasks" / "task002_old.json").write_text("{"))),
    Row("ni-categories-number", NI, "task001_new.json: 'Categories' must be a list",
        ni_task("task001_new", lambda task: task.update(Categories=5))),
    Row("ni-instances-number", NI, "task001_new.json: 'Instances' must be a list",
        ni_task("task001_new", lambda task: task.update(Instances=3))),
    Row("ni-output-number", NI, "task001_new.json: instance task001_new-000 has no output strings",
        ni_task("task001_new", lambda task: task["Instances"][0].update(output=7))),
    Row("ni-no-definition", NI, "task002_old.json: task has no 'Definition'",
        ni_task("task002_old", lambda task: task.pop("Definition"))),
    Row("ni-split-path-traversal", NI, "'../secret' is not a task name",
        ni_repo(lambda r: (r / "splits" / "default" / "train_tasks.txt").write_text("task001_new\n../secret\n"))),
    Row("ni-no-checkout", ("prepare", "ni", "--source", "nowhere", "--out", "shards"),
        "--source must be a natural-instructions checkout"),
    Row("ni-unknown-split", (*NI, "--split", "nope"), "--split must be one of ['default']", ni_repo()),
    # ---- `mttl prepare` --out
    Row("prepare-out-under-a-file", ("prepare", "synthetic", "--out", "notes.txt/shards"),
        "notes.txt' is a file, not a folder", write("notes.txt", "mine")),
    Row("prepare-out-dotdot", ("prepare", "synthetic", "--out", "somedir/.."), "must end in a new or existing folder",
        lambda t: (t / "somedir").mkdir()),
    Row("prepare-out-is-a-file", ("prepare", "synthetic", "--out", "notes.txt"), "is a file", write("notes.txt", "x")),
    Row("prepare-out-not-prepared", ("prepare", "synthetic", "--out", "thesis"), "is not a prepared folder",
        write("thesis/thesis.tex", "do not lose")),
    Row("prepare-ni-out-under-a-file", (*NI[:-1], "notes.txt/shards"), "is a file, not a folder",
        steps(ni_repo(), write("notes.txt", "x"))),
    # ---- promptsource templates (T0)
    Row("template-reaches-class", T0, "access to attribute '__class__' of 'str' object is unsafe",
        t0_source(template("{{ text.__class__.__mro__ }}"))),
    Row("template-reaches-globals", T0, "is unsafe",
        t0_source(template("{{ cycler.__init__.__globals__ }}"))),
    Row("templates-yaml-python-tag", T0, "is not valid template YAML",
        t0_source("dataset: toy\ntemplates:\n  a: !!python/object/apply:os.system ['echo hacked']\n")),
    # ---- run folders: finetune / evaluate / sweep / export
    Row("finetune-missing-run", ("finetune", "-k", "checkpoint=nope", "finetune_task_name=alpha"), "does not exist"),
    Row("finetune-no-task", ("finetune", "-k", "checkpoint=run"), "finetune_task_name=TASK", fake_run()),
    Row("evaluate-no-checkpoint", ("evaluate",), "evaluate needs a pre-trained run"),
    Row("evaluate-corrupt-tasks-json", ("evaluate", "-k", "checkpoint=run"), "tasks.json is not readable JSON",
        fake_run('{"alpha": 0,')),
    Row("evaluate-run-without-final", ("evaluate", "-k", "checkpoint=run"), "has no final/ yet", fake_run(final=False)),
    Row("sweep-tune-space-outside", ("sweep", "-k", "checkpoint=run", "tune_space=../tune_spaces/poly"),
        "tune_space '../tune_spaces/poly' is neither a .py file nor one of", fake_run()),
    Row("sweep-missing-space-file", ("sweep", "-k", "checkpoint=run", "tune_space=../evil.py"),
        "evil.py' does not exist; give a .py file", fake_run()),
    Row("export-corrupt-tasks-json", ("export", "run", "--format", "peft", "--out", "exp"),
        "tasks.json is not readable JSON", fake_run(b"\xff\xfe{"), absent=("exp",)),
    Row("export-tasks-json-list", ("export", "run", "--format", "peft", "--out", "exp"),
        "tasks.json must hold a JSON object", fake_run("[0, 1]"), absent=("exp",)),
    Row("export-tasks-json-text-rows", ("export", "run", "--format", "peft", "--out", "exp"),
        "must map task names to routing rows", fake_run('{"alpha": "zero"}'), absent=("exp",)),
    Row("export-missing-run", ("export", "nope", "--format", "peft", "--out", "exp"), "does not exist",
        absent=("exp",)),
    Row("export-not-a-run", ("export", "notes", "--format", "peft", "--out", "exp"), "is not a run folder",
        write("notes/todo.txt", "x"), absent=("exp",)),
    Row("export-out-not-empty", ("export", "run", "--format", "peft", "--out", "exp"), "already exists",
        steps(fake_run(), write("exp/mine.txt", "keep"))),
    Row("export-out-under-a-file", ("export", "run", "--format", "peft", "--out", "notes.txt/exp"),
        "notes.txt' is a file, not a folder", steps(fake_run(), write("notes.txt", "x"))),
    Row("export-out-dotdot", ("export", "run", "--format", "peft", "--out", "somedir/.."), "must end in a new",
        steps(fake_run(), lambda t: (t / "somedir").mkdir())),
    Row("export-bad-format", ("export", "run", "--format", "onnx", "--out", "exp"), "invalid choice: 'onnx'"),
    # ---- `mttl report`
    Row("report-missing-run", ("report", "nope", "--out", "rep"), "run folder 'nope' does not exist", absent=("rep",)),
    Row("report-not-a-run", ("report", "notes", "--out", "rep"), "is not a run folder",
        write("notes/todo.txt", "x"), absent=("rep",)),
    Row("report-bad-jsonl", ("report", "ft", "--out", "rep"), "results.jsonl line 1 is not valid JSON",
        write("ft/results.jsonl", "{oops\n"), absent=("rep",)),
    Row("report-jsonl-not-objects", ("report", "ft", "--out", "rep"), "line 1 is not a JSON object",
        write("ft/results.jsonl", "[1]\n"), absent=("rep",)),
    Row("report-result-fields-missing", ("report", "ft", "--out", "rep"),
        "lacks ['evaluation', 'metric', 'seed', 'value']",
        write("ft/results.jsonl", '{"task": "a"}\n'), absent=("rep",)),
    Row("report-binary-config", ("report", "pre", "--out", "rep"), "config.json is not a text file",
        steps(write("pre/metrics.jsonl", '{"step": 1, "loss": 1.0}\n'), write("pre/config.json", b"\xff\x00\xfe")),
        absent=("rep",)),
    Row("report-out-user-folder", ("report", "ft", "--out", "thesis"), "is not a report folder (it holds thesis.tex",
        steps(finetune_results, write("thesis/thesis.tex", "do not lose"))),
    Row("report-out-is-a-file", ("report", "ft", "--out", "thesis.tex"), "is a file, not a report folder",
        steps(finetune_results, write("thesis.tex", "do not lose"))),
    Row("report-out-under-a-file", ("report", "ft", "--out", "notes.txt/rep"), "notes.txt' is a file, not a folder",
        steps(finetune_results, write("notes.txt", "x"))),
    Row("report-out-dotdot", ("report", "ft", "--out", "somedir/.."), "must end in a new or existing folder",
        steps(finetune_results, lambda t: (t / "somedir").mkdir())),
    Row("report-would-overwrite-user-file", ("report", "ft", "--out", "rep"),
        "already holds results_per_task.csv, which mttl report did not write",
        steps(finetune_results, previous_report(["report.md"]), write("rep/results_per_task.csv", "mine"))),
    Row("report-damaged-marker", ("report", "ft", "--out", "rep"), "is damaged",
        steps(finetune_results, previous_report(["../outside.txt"]))),
    Row("report-max-heads-0", ("report", "ft", "--out", "rep", "--max-heads", "0"), "--max-heads must be at least 1",
        finetune_results, absent=("rep",)),
    # ---- usage
    Row("unknown-command", ("frobnicate",), "invalid choice: 'frobnicate'"),
    Row("unknown-option", ("pretrain", "--bogus"), "unrecognized arguments: --bogus"),
    Row("prepare-without-out", ("prepare", "synthetic"), "the following arguments are required: --out"),
    Row("prepare-bad-int", ("prepare", "synthetic", "--seed", "x", "--out", "shards"), "invalid int value: 'x'"),
]


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder`: file bytes, or None for a folder. Left out: the record of shards
    whose sha256 matched (shards.VERIFIED_CACHE), which pre-training keeps beside intact data even
    when a later check (an unknown task name) stops it; it is true whatever happens next."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))
            if p.name != shards.VERIFIED_CACHE}


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        return exit_.code


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_one_line_and_leaves_nothing(row: Row, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MTTL_TEST_UNSET_VAR", raising=False)
    monkeypatch.delenv("MTTL_DEBUG", raising=False)
    if row.setup is not None:
        row.setup(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    code = run_cli(list(row.argv))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == row.code, captured
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert row.expect in lines[0], lines[0]
    assert _snapshot(tmp_path) == before, "the command wrote, moved or deleted files"
    for path in row.absent:
        assert not (tmp_path / path).exists()


def test_the_table_covers_enough_cases():
    assert len(ROWS) >= 60 and len({row.id for row in ROWS}) == len(ROWS)


def test_saved_config_holds_no_credentials(tmp_path, monkeypatch):
    secrets = {"WANDB_API_KEY": "wandb-secret-1234", "AWS_SECRET_ACCESS_KEY": "aws-secret-5678",
               "MLFLOW_TRACKING_PASSWORD": "mlflow-secret-9012"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(None, ["wandb_project=demo", "mlflow_tracking_uri=file:./mlruns", "run_name=r"])
    for saved in (Config().save(tmp_path / "defaults"), cfg.save(tmp_path / "tracked")):
        text = saved.read_text()
        for name, value in secrets.items():
            assert value not in text and name not in text, (saved, name)
