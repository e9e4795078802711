"""The promptsource template renderer: YAML loading, rendering rules, errors, and the real templates.

Expected outputs are computed here independently: by hand for small templates, and for the real
held-out datasets with a plain (non-sandboxed) jinja2 environment reading the YAML with a loader
written in this file.
"""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter

import jinja2
import pytest
import yaml

from conftest import shared_path
from mttl.data.promptsource import Renderer, TemplateError, find_template_files, load_templates

CB_LIKE = """dataset: toy
subset: small
templates:
  id-2:
    !Template
    answer_choices: Yes ||| No ||| Maybe
    id: id-2
    jinja: '{{premise}} Question: {{hypothesis}}? ||| {% if label != -1 %}{{ answer_choices[label] }}{% endif %}'
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics:
      - Accuracy
      original_task: true
    name: b question
    reference: ''
  id-1: !Template
    answer_choices: null
    id: id-1
    jinja: '{{ ["Say", "Tell", "Write", "Give", "Show"] | choice }} the premise. ||| {{premise}}'
    metadata: !TemplateMetadata
      choices_in_prompt: null
      metrics: []
      original_task: false
    name: a random verb
    reference: ''
"""


def _write(tmp_path, text, name="toy"):
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "templates.yaml").write_text(text)
    return folder


def test_load_keeps_metadata_and_sorts_by_name(tmp_path):
    templates = load_templates(_write(tmp_path, CB_LIKE))
    assert (templates.dataset, templates.subset, templates.key) == ("toy", "small", "toy_small")
    assert [t.name for t in templates.templates] == ["a random verb", "b question"]
    question = templates.templates[1]
    assert question.metadata.original_task is True and question.metadata.choices_in_prompt is False
    assert question.metadata.metrics == ("Accuracy",)
    assert [t.name for t in templates.original_task_templates()] == ["b question"]


def test_loader_refuses_other_python_objects(tmp_path):
    evil = "dataset: x\ntemplates:\n  a: !!python/object/apply:os.system ['echo hacked']\n"
    with pytest.raises(TemplateError, match="templates.yaml"):
        load_templates(_write(tmp_path, evil, "evil"))


def test_render_splits_strips_and_protects_pipes(tmp_path):
    templates = load_templates(_write(tmp_path, CB_LIKE))
    question = templates.templates[1]
    renderer = Renderer(seed=0)
    row = {"premise": "  A ||| B ", "hypothesis": "C", "label": 2}
    out = renderer.render(question, row, row_key="r1", where="toy")
    assert out.source == "A ||| B  Question: C?"
    assert out.target == "Maybe"
    assert out.answer_choices == ["Yes", "No", "Maybe"]
    assert out.skip_reason is None
    unlabeled = renderer.render(question, {**row, "label": -1}, row_key="r2", where="toy")
    assert unlabeled.target == "" and unlabeled.skip_reason == "empty target"


def test_choice_filter_is_seeded_per_row(tmp_path):
    verb = load_templates(_write(tmp_path, CB_LIKE)).templates[0]
    row = {"premise": "p"}
    first = [Renderer(seed=1).render(verb, row, row_key=str(i), where="toy").source for i in range(40)]
    again = [Renderer(seed=1).render(verb, row, row_key=str(i), where="toy").source for i in range(40)]
    other = [Renderer(seed=2).render(verb, row, row_key=str(i), where="toy").source for i in range(40)]
    assert first == again
    assert first != other
    assert len(set(first)) > 1  # the filter does draw, it is not stuck on one choice
    assert {s.split()[0] for s in first} <= {"Say", "Tell", "Write", "Give", "Show"}


def test_missing_field_and_jinja_errors_name_the_template(tmp_path):
    question = load_templates(_write(tmp_path, CB_LIKE)).templates[1]
    with pytest.raises(TemplateError, match=r"toy.*'b question'.*field missing.*hypothesis"):
        Renderer().render(question, {"premise": "p", "label": 0}, row_key="r", where="toy", origin="rows.jsonl row 1")
    broken = load_templates(_write(tmp_path, CB_LIKE.replace("{{premise}} Question", "{{premise Question"), "broken"))
    with pytest.raises(TemplateError, match=r"'b question' has a jinja error"):
        Renderer().check(broken.templates[1], broken.path)


# ------------------------------------------------------------------ the real held-out templates

HELDOUT = {  # heldout_eval folder → (templates folder, gold label of a row)
    "super_glue_cb": ("super_glue/cb", lambda r: r["label"]),
    "super_glue_rte": ("super_glue/rte", lambda r: r["label"]),
    "super_glue_copa": ("super_glue/copa", lambda r: r["label"]),
    "super_glue_wic": ("super_glue/wic", lambda r: r["label"]),
    "super_glue_wsc": ("super_glue/wsc.fixed", lambda r: r["label"]),
    "winogrande_xl": ("winogrande/winogrande_xl", lambda r: int(r["answer"]) - 1),
    "hellaswag": ("hellaswag", lambda r: int(r["label"])),
}


class _PlainLoader(yaml.SafeLoader):
    """Reads !Template / !TemplateMetadata as plain dicts (independent of the module's loader)."""


_PlainLoader.add_constructor("!Template", lambda loader, node: loader.construct_mapping(node, deep=True))
_PlainLoader.add_constructor("!TemplateMetadata", lambda loader, node: loader.construct_mapping(node, deep=True))


def _plain_env():
    env = jinja2.Environment()
    rng = random.Random(0)
    env.filters["choice"] = lambda seq: rng.choice(list(seq))
    return env


def test_every_heldout_template_renders_every_row_and_gold_is_a_choice():
    root = shared_path("data", "t0")
    env = _plain_env()
    renderer = Renderer(seed=0)
    found = find_template_files(root / "promptsource_templates")
    for folder, (templates_folder, gold_of) in HELDOUT.items():
        rows = [json.loads(line) for line in gzip.open(root / "heldout_eval" / folder / "validation.jsonl.gz", "rt")]
        raw = yaml.load((root / "promptsource_templates" / templates_folder / "templates.yaml").read_text(),
                        Loader=_PlainLoader)["templates"]
        templates = load_templates(found[templates_folder.replace("/", "_")])
        assert len(templates.templates) == len(raw)
        for template in templates.templates:
            plain = raw[template.id]
            plain_choices = env.from_string(plain["answer_choices"] or "")
            plain_jinja = env.from_string(plain["jinja"])
            outcomes = Counter()
            for index, row in enumerate(rows):
                out = renderer.render(template, row, row_key=str(index), where=templates.path)
                outcomes[out.skip_reason or "rendered"] += 1
                if out.skip_reason is not None or not plain["metadata"]["original_task"]:
                    continue
                # independent expectation: split the answer choices rendered by plain jinja2
                choices = [c.strip() for c in plain_choices.render(**row).split("|||")]
                gold = choices[gold_of(row)]
                assert out.answer_choices == choices, (folder, template.name, index)
                assert out.target == gold, (folder, template.name, index, out.target, gold)
                assert out.source
            assert sum(outcomes.values()) == len(rows)
            # the only skips in this data: COPA's cause- or effect-only templates on the other kind
            # of question, which render an empty input (counted here with plain jinja2)
            if folder != "super_glue_copa":
                assert outcomes == {"rendered": len(rows)}, (folder, template.name, outcomes)
            else:
                empty = sum(not plain_jinja.render(**row, answer_choices=[row["choice1"], row["choice2"]])
                            .split("|||")[0].strip() for row in rows)
                assert outcomes == Counter({"rendered": len(rows) - empty, "empty input": empty}) - Counter(), \
                    (template.name, outcomes)
