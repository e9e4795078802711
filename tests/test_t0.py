"""`mttl prepare t0` on the real T0 files: held-out tasks, few-shot splits, mixture, raw datasets,
StoryCloze, and the bad-input cases (one line, exit code != 0, nothing left in --out).

Expected counts and labels are computed here from the JSON lines and YAML files directly.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter, defaultdict

import pytest
import yaml

from conftest import shared_path
from mttl.cli import main
from mttl.data import shards
from mttl.data.t0 import prepare_t0


class _PlainLoader(yaml.SafeLoader):
    pass


_PlainLoader.add_constructor("!Template", lambda loader, node: loader.construct_mapping(node, deep=True))
_PlainLoader.add_constructor("!TemplateMetadata", lambda loader, node: loader.construct_mapping(node, deep=True))


def _original_template_names(templates_yaml):
    raw = yaml.load(templates_yaml.read_text(), Loader=_PlainLoader)["templates"]
    return sorted(t["name"] for t in raw.values() if t["metadata"]["original_task"])


def _lines(path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _link_source(tmp_path, *parts):
    """A source folder holding links to parts of ../shared/data/t0 (the shared data stays read-only)."""
    root = shared_path("data", "t0")
    source = tmp_path / "source"
    source.mkdir()
    for part in parts:
        (source / part).symlink_to(root / part)
    return source


def _rows_by(out, **filters):
    table = shards.read_rows(out, **filters).to_pylist()
    grouped = defaultdict(list)
    for row in table:
        grouped[(row["task_name"], row["split"])].append(row)
    return grouped


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t0_heldout")
    source = _link_source(tmp, "heldout_eval", "heldout_fewshot", "promptsource_templates")
    manifest = prepare_t0(source, out=tmp / "out", tasks=["cb", "copa", "winogrande", "anli-r1"], storycloze_dir="")
    return source, tmp / "out", manifest


def test_heldout_rows_one_per_instance_and_template(heldout):
    source, out, manifest = heldout
    templates = source / "promptsource_templates"
    expected = {"cb": ("super_glue_cb", _original_template_names(templates / "super_glue/cb/templates.yaml")),
                "copa": ("super_glue_copa", _original_template_names(templates / "super_glue/copa/templates.yaml")[:8]),
                "winogrande": ("winogrande_xl",
                               _original_template_names(templates / "winogrande/winogrande_xl/templates.yaml"))}
    rows = _rows_by(out)
    for task, (folder, names) in expected.items():
        meta = manifest["tasks"][task]
        assert meta["role"] == "test" and meta["metric"] == "accuracy"
        assert [t["name"] for t in meta["templates"]] == names
        data = _lines(source / "heldout_eval" / folder / "validation.jsonl.gz")
        test_rows = rows[(task, "test")]
        assert len(test_rows) == len(data) * len(names) == meta["rows"]["test"]
        assert len({r["instance_id"] for r in test_rows}) == len(test_rows)
        for row in test_rows:
            index = int(row["instance_id"].split("/")[2])
            original = data[index]
            gold = int(original["answer"]) - 1 if task == "winogrande" else original["label"]
            assert row["label"] == gold
            assert row["answer_choices"][gold] == row["target"] == row["references"][0]
            if task == "winogrande":
                assert row["answer_choices"] == [original["option1"], original["option2"]]
            if task == "copa":
                assert row["answer_choices"] == [original["choice1"], original["choice2"]]
            if task == "cb":
                assert original["premise"].strip()[:20] in row["source"]
    # COPA's first 8 templates (by name) work for cause and effect questions alike: nothing skipped
    assert manifest["skipped"]["rendering"] == {}


def test_fewshot_files_become_fewshot_splits(heldout):
    source, out, manifest = heldout
    for task in ("cb", "copa", "winogrande", "anli-r1"):
        n_templates = manifest["tasks"][task]["rows_per_instance"]
        files = sorted((source / "heldout_fewshot" / task).glob("*_shot/*_seed.jsonl.gz"))
        assert files
        for path in files:
            k, seed = re.match(r"(\d+)_shot/(\d+)_seed", f"{path.parent.name}/{path.name}").groups()
            split = f"fewshot_k{k}_seed{seed}"
            assert manifest["tasks"][task]["rows"][split] == len(_lines(path)) * n_templates, (task, split)
    # ANLI has few-shot files but no evaluation file here: reported, not an error
    assert "test" not in manifest["tasks"]["anli-r1"]["rows"]
    assert "anli-r1:test" in manifest["skipped"]["absent"]
    assert "storycloze" not in manifest["tasks"]
    assert set(manifest["tasks"]) == {"cb", "copa", "winogrande", "anli-r1"}


def test_prepare_again_is_a_noop_and_check_is_clean(heldout):
    source, out, manifest = heldout
    assert shards.check(out) == []
    again = prepare_t0(source, out=out, tasks=["cb", "copa", "winogrande", "anli-r1"], storycloze_dir="")
    assert again.get("unchanged") is True


def test_absent_parts_are_reported_not_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("STORYCLOZE_DIR", raising=False)
    source = _link_source(tmp_path, "promptsource_templates")
    (source / "heldout_eval").mkdir()
    (source / "heldout_eval" / "super_glue_cb").symlink_to(shared_path("data", "t0", "heldout_eval", "super_glue_cb"))
    manifest = prepare_t0(source, out=tmp_path / "out")
    assert set(manifest["tasks"]) == {"cb"}
    absent = manifest["skipped"]["absent"]
    assert "STORYCLOZE_DIR" in absent["storycloze"]
    assert {"rte", "copa", "wic", "wsc", "winogrande", "h-swag", "anli-r1", "anli-r2", "anli-r3"} <= set(absent)


# --------------------------------------------------------------------- training tasks


def _mixture_sample(tmp_path, prefixes=("glue_mrpc_", "ag_news_")):
    rows = [r for r in _lines(shared_path("data", "t0", "train_mixture", "t0_train_sample.jsonl.gz"))
            if r["template"].startswith(prefixes)]
    source = _link_source(tmp_path, "promptsource_templates")
    (source / "train_mixture").mkdir()
    with gzip.open(source / "train_mixture" / "sample.jsonl.gz", "wt") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return source, rows


def test_mixture_rows_become_dataset_or_template_tasks(tmp_path):
    source, rows = _mixture_sample(tmp_path)
    by_dataset = Counter("glue_mrpc" if r["template"].startswith("glue_mrpc_") else "ag_news" for r in rows)
    manifest = prepare_t0(source, out=tmp_path / "datasets", seed=1)
    assert set(manifest["tasks"]) == set(by_dataset)
    for task, n in by_dataset.items():
        meta = manifest["tasks"][task]
        assert meta["role"] == "train" and meta["metric"] == "rouge"
        assert meta["rows"] == {"train": n - min(100, n // 10), "validation": min(100, n // 10)}
    written = shards.read_rows(tmp_path / "datasets").to_pylist()
    assert (Counter((r["source"], r["target"]) for r in written)
            == Counter((r["source"].strip(), r["target"].strip()) for r in rows))

    per_template = prepare_t0(source, out=tmp_path / "templates", use_t0_templates_as_tasks=True,
                              max_train_per_task=50)
    by_template = Counter(rows_t["template"] for rows_t in rows)
    expected_names = {("glue_mrpc/" + t[len("glue_mrpc_"):]) if t.startswith("glue_mrpc_")
                      else "ag_news/" + t[len("ag_news_"):] for t in by_template}
    assert set(per_template["tasks"]) == expected_names
    for name, meta in per_template["tasks"].items():
        n = by_template[name.replace("/", "_")]
        assert meta["rows"] == {"train": min(50, n - min(100, n // 10)), "validation": min(100, n // 10)}
        assert "original_task" in meta and "template" in meta


def test_raw_dataset_rendered_with_every_template(tmp_path):
    source = _link_source(tmp_path, "promptsource_templates")
    (source / "glue_mrpc").mkdir()
    data = [{"sentence1": f"The cat number {i} sat.", "sentence2": f"Cat {i} was sitting.", "label": i % 2, "idx": i}
            for i in range(30)]
    (source / "glue_mrpc" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    manifest = prepare_t0(source, out=tmp_path / "out", use_t0_templates_as_tasks=True)
    raw = yaml.load((source / "promptsource_templates/glue/mrpc/templates.yaml").read_text(),
                    Loader=_PlainLoader)["templates"]
    n_paraphrase = sum(r["label"] == 1 for r in data)
    for template in raw.values():
        task = "glue_mrpc/" + re.sub(r"\W+", "_", template["name"])
        # the paraphrase-generation templates render only for label-1 rows (an `if` around everything)
        generates = template["jinja"].lstrip("'").startswith("{% if label == 1 %}")
        expected = n_paraphrase if generates else len(data)
        assert sum(manifest["tasks"][task]["rows"].values()) == expected, template["name"]
        skipped = manifest["skipped"]["rendering"].get(f"glue_mrpc/{template['name']}", {})
        assert skipped == ({"empty input": len(data) - n_paraphrase} if generates else {})
    for row in shards.read_rows(tmp_path / "out").to_pylist():
        if row["answer_choices"]:
            assert row["answer_choices"][row["label"]] == row["target"]


STORY_TEMPLATE = """dataset: story_cloze
subset: '2016'
templates:
  s1: !Template
    answer_choices: '{{sentence_quiz1}} ||| {{sentence_quiz2}}'
    id: s1
    jinja: '{{input_sentence_1}} {{input_sentence_2}} {{input_sentence_3}} {{input_sentence_4}} What happens next?
      ||| {{answer_choices[answer_right_ending | int - 1]}}'
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics: [Accuracy]
      original_task: true
    name: next
    reference: ''
"""
STORY_COLUMNS = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
                 "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]


def test_storycloze_from_official_csv(tmp_path):
    import csv

    templates = tmp_path / "templates" / "story_cloze" / "2016"
    templates.mkdir(parents=True)
    (templates / "templates.yaml").write_text(STORY_TEMPLATE)
    stories = tmp_path / "storycloze"
    stories.mkdir()
    for name, n in (("cloze_test_val__spring2016 - cloze_test_ALL_val.csv", 6),
                    ("cloze_test_test__spring2016 - cloze_test_ALL_test.csv", 4)):
        with open(stories / name, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(STORY_COLUMNS)
            for i in range(n):
                writer.writerow([f"id{i}", "A", "B", "C", f"D{i}", f"end one {i}", f"end two {i}", 1 + i % 2])
    (tmp_path / "source").mkdir()
    manifest = prepare_t0(tmp_path / "source", tmp_path / "templates", tmp_path / "out",
                          storycloze_dir=stories, tasks=["storycloze"])
    assert manifest["tasks"]["storycloze"]["rows"] == {"test": 4, "train": 6}
    for row in shards.read_rows(tmp_path / "out").to_pylist():
        i = int(row["source"].split("D")[1].split()[0])
        assert row["label"] == i % 2
        assert row["target"] == (f"end one {i}" if i % 2 == 0 else f"end two {i}")


# ------------------------------------------------------------------------------ bad input


def _cli(capsys, *argv):
    code = main(["prepare", "t0", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return code, err


def _cb_source(tmp_path, rows=None, template_text=None):
    root = shared_path("data", "t0")
    source = tmp_path / "source"
    (source / "heldout_eval" / "super_glue_cb").mkdir(parents=True)
    rows = rows if rows is not None else _lines(root / "heldout_eval" / "super_glue_cb" / "validation.jsonl.gz")[:5]
    (source / "heldout_eval" / "super_glue_cb" / "validation.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    templates = source / "promptsource_templates" / "super_glue" / "cb"
    templates.mkdir(parents=True)
    text = (root / "promptsource_templates" / "super_glue" / "cb" / "templates.yaml").read_text()
    (templates / "templates.yaml").write_text(template_text(text) if template_text else text)
    return source


def _assert_one_line_error(code, err, out, *fragments):
    assert code != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists() or (out / "manifest.json").is_file()


def test_jinja_error_in_a_template(tmp_path, capsys):
    source = _cb_source(tmp_path, template_text=lambda t: t.replace("Suppose {{premise}}", "Suppose {{premise"))
    out = tmp_path / "out"
    code, err = _cli(capsys, "--source", source, "--out", out, "--tasks", "cb")
    _assert_one_line_error(code, err, out, "super_glue/cb/templates.yaml", "'can we infer'", "jinja error")
    assert not out.exists()


def test_template_field_missing_from_rows(tmp_path, capsys):
    rows = [{"premise": "It rains.", "idx": 0, "label": 0}]  # no hypothesis
    source = _cb_source(tmp_path, rows=rows)
    out = tmp_path / "out"
    code, err = _cli(capsys, "--source", source, "--out", out, "--tasks", "cb")
    _assert_one_line_error(code, err, out, "hypothesis", "validation.jsonl row 1", "templates.yaml")
    assert not out.exists()


def test_unknown_dataset_and_task(tmp_path, capsys):
    source = _cb_source(tmp_path)
    (source / "my_dataset").mkdir()
    (source / "my_dataset" / "train.jsonl").write_text('{"text": "x"}\n')
    out = tmp_path / "out"
    code, err = _cli(capsys, "--source", source, "--out", out)
    _assert_one_line_error(code, err, out, "unknown dataset 'my_dataset'", str(source / "my_dataset"))
    assert not out.exists()
    (source / "my_dataset" / "train.jsonl").unlink()
    (source / "heldout_eval" / "super_glue_cbb").mkdir()
    code, err = _cli(capsys, "--source", source, "--out", out)
    _assert_one_line_error(code, err, out, "heldout_eval", "super_glue_cbb")
    code, err = _cli(capsys, "--source", source, "--out", out, "--tasks", "cb", "nosuchtask")
    _assert_one_line_error(code, err, out, "nosuchtask")
    assert not out.exists()


def test_failed_prepare_keeps_the_previous_output(tmp_path, capsys):
    source = _cb_source(tmp_path)
    out = tmp_path / "out"
    assert _cli(capsys, "--source", source, "--out", out, "--tasks", "cb")[0] == 0
    before = (out / "manifest.json").read_text()
    with open(source / "heldout_eval" / "super_glue_cb" / "validation.jsonl", "a") as fh:
        fh.write("{not json\n")
    code, err = _cli(capsys, "--source", source, "--out", out, "--tasks", "cb")
    _assert_one_line_error(code, err, out, "validation.jsonl", "line 6")
    assert (out / "manifest.json").read_text() == before and shards.check(out) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
