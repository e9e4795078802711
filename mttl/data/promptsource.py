"""promptsource templates: reading `templates.yaml` files and rendering rows with them.

The promptsource package does not install on Python 3.11, so this module reads its template
collection directly. It owns:

- loading `templates.yaml` (the `!Template` / `!TemplateMetadata` tags) with a `yaml.SafeLoader`
  subclass that knows only those two tags: no other Python object can be constructed from a file;
- rendering a row with a template the way promptsource does: the row's fields (and
  `answer_choices`, itself a jinja template split on `|||`) are the jinja variables, the output
  is split on `|||` into input and target, each part stripped; `|||` inside field values is
  protected so it cannot split the output;
- the `choice` filter (and jinja's `random`) drawing from a generator seeded per render, so a
  prepared folder is the same every time.

Templates are rendered in jinja's sandbox with undefined variables as errors: a template naming a
field the rows lack raises `TemplateError` (a `DataError`) instead of rendering an empty string.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.sandbox
import yaml

from mttl.errors import DataError

SEPARATOR = "|||"
# Stands in for `|||` inside field values while rendering, so data cannot add a split point.
_PROTECTED_SEPARATOR = "\u241e\u241e\u241e"
TEMPLATES_FILE = "templates.yaml"


class TemplateError(DataError):
    """A template that cannot be used: bad jinja, or a field the rows do not have."""


@dataclass(frozen=True)
class TemplateMetadata:
    original_task: bool | None = None
    choices_in_prompt: bool | None = None
    metrics: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Template:
    id: str
    name: str
    jinja: str
    answer_choices: str | None = None
    metadata: TemplateMetadata = TemplateMetadata()
    reference: str = ""
    extra: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Rendered:
    source: str
    target: str
    answer_choices: list[str] | None

    @property
    def skip_reason(self) -> str | None:
        """Why this rendering cannot be a row (promptsource's "empty output"), else None."""
        if not self.source:
            return "empty input"
        if not self.target:
            return "empty target"
        return None


@dataclass
class DatasetTemplates:
    """The templates of one dataset (or dataset subset), in promptsource's order: by name."""
    dataset: str
    subset: str | None
    path: Path
    templates: list[Template]

    @property
    def key(self) -> str:
        """`dataset` or `dataset_subset`: the folder name of the dataset's rows and P3's task prefix."""
        return self.dataset if not self.subset else f"{self.dataset}_{self.subset}"

    def original_task_templates(self) -> list[Template]:
        return [t for t in self.templates if t.metadata.original_task]


class _TemplateLoader(yaml.SafeLoader):
    """SafeLoader plus promptsource's two tags; every other tag is still refused."""


def _construct_template(loader: yaml.SafeLoader, node: yaml.Node) -> Template:
    values = loader.construct_mapping(node, deep=True)
    known = {"id", "name", "jinja", "answer_choices", "metadata", "reference"}
    return Template(id=str(values.get("id", "")), name=str(values.get("name", "")), jinja=values.get("jinja") or "",
                    answer_choices=values.get("answer_choices"),
                    metadata=values.get("metadata") or TemplateMetadata(),
                    reference=values.get("reference") or "",
                    extra={k: v for k, v in values.items() if k not in known})


def _construct_metadata(loader: yaml.SafeLoader, node: yaml.Node) -> TemplateMetadata:
    values = loader.construct_mapping(node, deep=True)
    known = {"original_task", "choices_in_prompt", "metrics"}
    return TemplateMetadata(original_task=values.get("original_task"),
                            choices_in_prompt=values.get("choices_in_prompt"),
                            metrics=tuple(values.get("metrics") or ()),
                            extra={k: v for k, v in values.items() if k not in known})


_TemplateLoader.add_constructor("!Template", _construct_template)
_TemplateLoader.add_constructor("!TemplateMetadata", _construct_metadata)


def load_templates(path: str | Path) -> DatasetTemplates:
    """Read one `templates.yaml` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / TEMPLATES_FILE
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TemplateLoader)
    except FileNotFoundError:
        raise TemplateError(f"{path} not found; --templates must be a promptsource templates folder "
                            "(<dataset>[/<subset>]/templates.yaml)") from None
    except yaml.YAMLError as err:
        raise TemplateError(f"{path} is not valid template YAML ({' '.join(str(err).split())[:200]}); "
                            "fix the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("templates"), dict) or "dataset" not in data:
        raise TemplateError(f"{path} lacks 'dataset' or 'templates'; it is not a promptsource templates file")
    templates = []
    for template_id, template in data["templates"].items():
        if not isinstance(template, Template):
            raise TemplateError(f"{path}: entry {template_id} is not a !Template")
        templates.append(template)
    templates.sort(key=lambda t: t.name)
    return DatasetTemplates(dataset=str(data["dataset"]), subset=data.get("subset") or None, path=path,
                            templates=templates)


def find_template_files(root: str | Path) -> dict[str, Path]:
    """`dataset[_subset]` → templates.yaml for every template file under `root`."""
    root = Path(root)
    found = {}
    for path in sorted(root.rglob(TEMPLATES_FILE)):
        parts = path.parent.relative_to(root).parts
        found["_".join(parts)] = path
    return found


def _most_frequent(items: Iterable) -> list:
    """The items tied for the highest count, in first-seen order (promptsource's filter)."""
    counts = Counter(items)
    if not counts:
        return []
    top = max(counts.values())
    return [item for item, count in counts.items() if count == top]


def _protect(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(SEPARATOR, _PROTECTED_SEPARATOR)
    if isinstance(value, dict):
        return {k: _protect(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_protect(v) for v in value]
    return value


def _unprotect(text: str) -> str:
    return text.replace(_PROTECTED_SEPARATOR, SEPARATOR).strip()


class Renderer:
    """Renders rows with templates; compiled templates are cached, randomness is seeded per call."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._rng = random.Random(seed)
        self._env = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                                        keep_trailing_newline=True)
        self._env.filters["choice"] = lambda seq: self._rng.choice(list(seq))
        self._env.filters["random"] = lambda seq: self._rng.choice(list(seq))
        self._env.filters["most_frequent"] = _most_frequent
        self._compiled: dict[tuple[str, str], jinja2.Template] = {}

    def _compile(self, text: str, template: Template, where: Path | str) -> jinja2.Template:
        key = (template.id, text)
        if key not in self._compiled:
            try:
                self._compiled[key] = self._env.from_string(text)
            except jinja2.TemplateSyntaxError as err:
                raise TemplateError(f"{where}: template {template.name!r} has a jinja error "
                                    f"(line {err.lineno}: {err.message}); fix the template") from None
        return self._compiled[key]

    def check(self, template: Template, where: Path | str) -> None:
        """Compile the template and its answer choices now, so syntax errors surface before any row."""
        self._compile(template.jinja, template, where)
        if template.answer_choices:
            self._compile(template.answer_choices, template, where)

    def render(self, template: Template, row: dict, *, row_key: str, where: Path | str,
               origin: str = "the rows") -> Rendered:
        """Render `row`; `row_key` (e.g. the instance id) seeds the random filters for this row.

        Raises TemplateError for jinja errors and for fields missing from the row; other
        exceptions a template raises on a particular row (an index out of range, …) propagate
        for the caller to count.
        """
        self._rng.seed(f"{self.seed}/{template.id}/{row_key}")
        if "answer_choices" in row:
            raise TemplateError(f"{origin}: rows have a field named 'answer_choices', which templates reserve; "
                                "rename it")
        variables = _protect(row)
        try:
            choices = None
            if template.answer_choices:
                text = self._compile(template.answer_choices, template, where).render(**variables)
                choices = [_unprotect(c) for c in text.split(SEPARATOR)]
            output = self._compile(template.jinja, template, where).render(**variables, answer_choices=choices)
        except jinja2.UndefinedError as err:
            raise TemplateError(f"{where}: template {template.name!r} uses a field missing from {origin} "
                                f"({err.message}); the rows do not match this dataset's templates") from None
        except jinja2.TemplateError as err:
            raise TemplateError(f"{where}: template {template.name!r} fails on {origin} ({err}); "
                                "fix the template") from None
        parts = output.split(SEPARATOR)
        source = _unprotect(parts[0])
        target = _unprotect(parts[1]) if len(parts) > 1 else ""
        return Rendered(source=source, target=target, answer_choices=choices)
