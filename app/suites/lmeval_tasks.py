"""An lm-evaluation-harness task YAML, turned into a forgetguard benchmark suite.

``forgetguard suites import --lm-eval TASK.yaml`` reads a task the way lm-eval 0.4.13 reads it
(``lm_eval/tasks/_yaml_loader.py`` for ``include:``, ``lm_eval/config/task.py`` for the keys
and their defaults, ``lm_eval/api/task.py`` ``ConfigurableTask`` for ``doc_to_text``,
``doc_to_choice``, ``doc_to_target``, ``description`` and the few-shot pool) and writes what
lm-eval would put before the model as a :class:`ChoiceBenchmark` with one convention,
``"lm-eval"``. Nothing here imports lm-eval, runs code from the task or touches the network:

- data are local files only (``dataset_path: json | csv | parquet | arrow`` with
  ``dataset_kwargs.data_files``), inside ``FORGETGUARD_DATA_ROOTS``, read as a client's files;
- templates render in Jinja's immutable sandbox, with lm-eval's one custom filter;
- ``!function``, ``process_docs``, ``class`` and every key that would change what is scored
  in a way this module does not reproduce are refused, naming the file and line; keys that
  change no score are ignored by an explicit list (:data:`IGNORED_KEYS`).

A refusal is an :class:`LmEvalTaskError` whose message lists every problem, one per line; the
caller creates nothing. Where forgetguard's reading deliberately differs from lm-eval's (a
relative data file resolves against the YAML's folder, not the working directory), the
docstrings say so.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import ValidationError

from app.core.clientfiles import ReadBudget, read_client_file
from app.core.errors import Problem
from app.core.paths import resolve_under
from app.suites.benchmarks.arrow import ArrowError, read_stream
from app.suites.benchmarks.items import (
    MAX_FEWSHOT,
    ChoiceBenchmark,
    ChoiceItem,
    Convention,
    ConventionSpec,
    Fewshot,
    Metric,
    Rendering,
)

CONVENTION: Convention = "lm-eval"
MAX_YAML_BYTES = 1024 * 1024
MAX_INCLUDE_DEPTH = 16
MAX_ERRORS = 10  # per-document problems listed before giving up

# Keys read and honoured (lm_eval/config/task.py TaskConfig), besides ``include``.
SUPPORTED_KEYS = frozenset(
    {
        "task", "output_type", "dataset_path", "dataset_name", "dataset_kwargs",
        "training_split", "validation_split", "test_split", "fewshot_split",
        "doc_to_text", "doc_to_target", "doc_to_choice", "description",
        "target_delimiter", "fewshot_delimiter", "num_fewshot", "metric_list",
        "fewshot_config",
    }
)  # fmt: skip
# Keys that change no prompt and no score of a multiple-choice task: ignored, and why.
IGNORED_KEYS = {
    "tag": "files the task under a name in lm-eval's registry",
    "task_alias": "a display name",
    "metadata": "free-form notes (the task's version)",
    "should_decontaminate": "decontamination reports only",
    "doc_to_decontamination_query": "decontamination reports only",
    "generation_kwargs": "used by generate_until only",
}
# Keys accepted only at lm-eval's default: any other value changes what is scored in a way
# this importer does not reproduce.
DEFAULT_ONLY_KEYS: dict[str, tuple[object, str]] = {
    "process_docs": (None, "preprocess the data file instead (forgetguard runs no task code)"),
    "process_results": (None, "forgetguard scores acc, acc_norm or acc_bytes itself"),
    "custom_dataset": (None, "point dataset_kwargs.data_files at a local file"),
    "use_prompt": (None, "promptsource prompts are not supported; write doc_to_text"),
    "gen_prefix": (None, "an answer prefix is not supported yet"),
    "doc_to_image": (None, "multimodal tasks are not supported"),
    "doc_to_audio": (None, "multimodal tasks are not supported"),
    "filter_list": (None, "filters are not supported"),
    "repeats": (1, "repeated requests are not supported"),
    "unsafe_code": (False, "forgetguard runs no task code"),
}
GROUP_KEYS = frozenset({"group", "group_alias", "task_list", "aggregate_metric_list"})
LOCAL_FORMATS = ("json", "csv", "parquet", "arrow")
# lm-eval's metric name -> forgetguard's (the same quantity, docs/benchmarks.md "Metrics").
METRICS: dict[str, Metric] = {"acc": "acc", "acc_norm": "acc_norm", "acc_bytes": "acc_bytes"}
# Which metric the suite reports when the task lists several: acc_norm first, as the pulled
# ARC and HellaSwag suites report it (lm-eval lists acc and acc_norm for both).
METRIC_PREFERENCE: tuple[Metric, ...] = ("acc_norm", "acc", "acc_bytes")
# lm-eval's default metrics for multiple_choice (lm_eval/api/registry.py).
DEFAULT_METRICS = ("acc", "acc_norm")
SAMPLERS = {"default": "random", "first_n": "first_n"}
FEWSHOT_CONFIG_KEYS = frozenset({"sampler", "split"})
# pandas.read_csv's default missing-value markers (lm-eval reads CSV through datasets/pandas).
CSV_NA = frozenset(
    {
        "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
        "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
    }
)  # fmt: skip
CSV_TRUE, CSV_FALSE = frozenset({"True", "TRUE", "true"}), frozenset({"False", "FALSE", "false"})


class LmEvalTaskError(ValueError):
    """A task file that cannot be imported faithfully; one problem per line, each naming where."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Where:
    """A place in a task file: the file as the user named it, its line, and its folder."""

    shown: str
    line: int
    folder: Path

    def __str__(self) -> str:
        return f"{self.shown}:{self.line}"


@dataclass(frozen=True)
class FunctionTag:
    """A ``!function module.name`` value: recorded with its line, never imported."""

    name: str
    where: Where


class _Loader(yaml.SafeLoader):
    """YAML's safe loader that keeps ``!function`` tags as values instead of failing on them."""

    shown = ""
    folder = Path(".")


def _function_tag(loader: _Loader, node: yaml.Node) -> FunctionTag:
    name = loader.construct_scalar(node)  # type: ignore[arg-type,unused-ignore]
    return FunctionTag(str(name), Where(loader.shown, node.start_mark.line + 1, loader.folder))


_Loader.add_constructor("!function", _function_tag)  # type: ignore[arg-type,unused-ignore]


def _regex_replace(string: str, pattern: str, repl: str, count: int = 0) -> str:
    """lm-eval's one custom Jinja filter (lm_eval/utils.py)."""
    return re.sub(pattern, repl, string, count=count)


def jinja_env() -> ImmutableSandboxedEnvironment:
    """lm-eval's template environment (StrictUndefined, trailing newlines kept), sandboxed."""
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = _regex_replace
    return env


# --------------------------------------------------------------------------- the YAML


Entries = dict[str, tuple[Any, Where]]


@dataclass
class _Files:
    """Every file the task was read from, for the suite's description: (name, sha256)."""

    yaml: list[tuple[str, str]] = field(default_factory=list)
    data: list[tuple[str, str, str]] = field(default_factory=list)  # split, name, sha256


def _read_yaml(path: Path, shown: str, files: _Files) -> Entries:
    try:
        raw = path.read_bytes()[: MAX_YAML_BYTES + 1]
    except OSError as exc:
        raise LmEvalTaskError([f"{shown}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_YAML_BYTES:
        raise LmEvalTaskError([f"{shown}: larger than {MAX_YAML_BYTES} bytes; not a task file"])
    files.yaml.append((path.name, hashlib.sha256(raw).hexdigest()))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LmEvalTaskError([f"{shown}: not UTF-8 text"]) from None
    loader = _Loader(text)
    loader.shown, loader.folder = shown, path.parent
    entries: Entries = {}
    try:
        node = loader.get_single_node()
        if not isinstance(node, yaml.MappingNode):
            line = node.start_mark.line + 1 if node is not None else 1
            raise LmEvalTaskError([f"{shown}:{line}: a task file is a mapping of keys"])
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            where = Where(shown, key_node.start_mark.line + 1, path.parent)
            if not isinstance(key, str):
                raise LmEvalTaskError([f"{where}: key {key!r} is not a string"])
            entries[key] = (loader.construct_object(value_node, deep=True), where)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "invalid YAML"
        raise LmEvalTaskError([f"{shown}:{line}: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise LmEvalTaskError([f"{shown}: invalid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    return entries


def load_entries(path: Path, shown: str, files: _Files, _stack: tuple[Path, ...] = ()) -> Entries:
    """The task's keys with where each was written, ``include:`` merged as lm-eval merges it:
    the included files in order, then the file's own keys, which win; ``task_list`` of an
    included file is dropped. Only local files are included."""
    resolved = path.resolve()
    if resolved in _stack:
        raise LmEvalTaskError([f"{shown}: includes itself (an include cycle)"])
    if len(_stack) >= MAX_INCLUDE_DEPTH:
        raise LmEvalTaskError([f"{shown}: includes nest deeper than {MAX_INCLUDE_DEPTH}"])
    entries = _read_yaml(path, shown, files)
    if "include" not in entries:
        return entries
    includes, where = entries.pop("include")
    merged: Entries = {}
    for include in includes if isinstance(includes, list) else [includes]:
        if not isinstance(include, str) or not include or "://" in include:
            raise LmEvalTaskError(
                [f"{where}: include {include!r} is not a local file; forgetguard includes "
                 "task files from disk only"]
            )  # fmt: skip
        target = Path(include).expanduser()
        target = target if target.is_absolute() else path.parent / target
        inc_shown = include if Path(include).is_absolute() else str(Path(shown).parent / include)
        if not target.is_file():
            raise LmEvalTaskError(
                [f"{where}: include {include!r} is not a file (a relative include is read from "
                 f"the folder of {shown}, as lm-eval reads it)"]
            )  # fmt: skip
        included = load_entries(target, inc_shown, files, (*_stack, resolved))
        included.pop("task_list", None)
        merged.update(included)
    merged.update(entries)
    return merged


def _function_tags(value: Any) -> Iterator[FunctionTag]:
    if isinstance(value, FunctionTag):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _function_tags(item)
    elif isinstance(value, list):
        for item in value:
            yield from _function_tags(item)


def check_keys(entries: Entries) -> list[str]:
    """Every key that this importer cannot honour, one problem each, in file order."""
    problems: list[str] = []
    for key, (value, where) in sorted(
        entries.items(), key=lambda kv: (kv[1][1].shown, kv[1][1].line)
    ):
        tags = list(_function_tags(value))
        if tags:
            problems.extend(
                f"{tag.where}: {key}: !function {tag.name} is Python code in the task's folder; "
                "forgetguard runs no code from a task file (write it as a Jinja template, or "
                "preprocess the data file)"
                for tag in tags
            )
        elif key in SUPPORTED_KEYS or key in IGNORED_KEYS:
            continue
        elif key in DEFAULT_ONLY_KEYS:
            default, hint = DEFAULT_ONLY_KEYS[key]
            if value is not None and value != default:
                problems.append(f"{where}: {key} is not supported ({hint})")
        elif key == "class":
            problems.append(f"{where}: class: a Python task class is not supported")
        elif key in GROUP_KEYS:
            problems.append(
                f"{where}: {key}: this is a group of tasks, not a task; import each task's YAML"
            )
        else:
            problems.append(
                f"{where}: unknown key {key!r}; forgetguard reads "
                f"{', '.join(sorted(SUPPORTED_KEYS))} and ignores {', '.join(IGNORED_KEYS)}"
            )
    return problems


# --------------------------------------------------------------------------- the data


def _rows_json(data: bytes, shown: str) -> list[dict[str, Any]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{shown} is not UTF-8 text") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{shown} is not valid JSON: {exc}") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise ValueError(f"{shown}:{number}: not valid JSON: {exc}") from None
    if not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{shown}: every record must be a JSON object (JSON Lines, or one array)")
    # pyarrow's JSON reader (datasets' json builder) makes a column of ints and floats floats.
    columns = {key for row in rows for key in row}
    for key in columns:
        values = [row.get(key) for row in rows]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if any(isinstance(v, float) for v in numbers) and any(isinstance(v, int) for v in numbers):
            for row in rows:
                if isinstance(row.get(key), int) and not isinstance(row.get(key), bool):
                    row[key] = float(row[key])
    return rows


def _csv_column(values: list[str]) -> list[Any]:
    """One CSV column typed as pandas.read_csv types it: int, float, bool or str, NA as None."""
    present = [v for v in values if v not in CSV_NA]

    def parses(convert: Callable[[str], object]) -> bool:
        try:
            for v in present:
                convert(v)
        except ValueError:
            return False
        return True

    if present and all(v in CSV_TRUE or v in CSV_FALSE for v in present):
        return [None if v in CSV_NA else v in CSV_TRUE for v in values]
    if present and parses(int) and len(present) == len(values):
        return [int(v) for v in values]
    if present and parses(float):
        return [None if v in CSV_NA else float(v) for v in values]
    return [None if v in CSV_NA else v for v in values]


def _rows_csv(data: bytes, shown: str) -> list[dict[str, Any]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{shown} is not UTF-8 text") from None
    table = list(csv.reader(io.StringIO(text, newline="")))
    if not table:
        raise ValueError(f"{shown} is empty")
    header, body = table[0], [r for r in table[1:] if r]
    if any(len(r) != len(header) for r in body):
        raise ValueError(f"{shown}: every row must have the header's {len(header)} fields")
    columns = [_csv_column([r[i] for r in body]) for i in range(len(header))]
    return [{name: columns[i][n] for i, name in enumerate(header)} for n in range(len(body))]


def _rows_parquet(data: bytes, shown: str) -> list[dict[str, Any]]:
    try:
        import pyarrow as pa  # type: ignore[import-not-found,unused-ignore]
        import pyarrow.parquet as pq  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ValueError(
            f"{shown}: reading Parquet needs pyarrow, which forgetguard does not install; "
            "install pyarrow where you run this command, or convert the file to JSON Lines "
            "(dataset_path: json)"
        ) from None
    rows: list[dict[str, Any]] = pq.read_table(pa.BufferReader(data)).to_pylist()
    return rows


def _rows_arrow(data: bytes, shown: str) -> list[dict[str, Any]]:
    try:
        return read_stream(data)
    except ArrowError as exc:
        raise ValueError(f"{shown}: {exc}") from None


READERS: dict[str, Callable[[bytes, str], list[dict[str, Any]]]] = {
    "json": _rows_json,
    "csv": _rows_csv,
    "parquet": _rows_parquet,
    "arrow": _rows_arrow,
}


@dataclass(frozen=True)
class DataAccess:
    """Where data files may be read from and how much of them (the caller's settings)."""

    roots: list[Path]
    max_bytes: int
    budget: ReadBudget


def _data_files(value: Any, where: Where) -> dict[str, list[str]]:
    """``data_files`` as datasets reads it: a string or a list is the split ``train``."""
    if isinstance(value, str):
        value = {"train": [value]}
    elif isinstance(value, list):
        value = {"train": value}
    if not isinstance(value, dict) or not value:
        raise LmEvalTaskError(
            [f"{where}: dataset_kwargs.data_files must be a file, a list of files, or a mapping "
             "from split name to file(s)"]
        )  # fmt: skip
    files = {}
    for split, names in value.items():
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise LmEvalTaskError([f"{where}: data_files[{split!r}] must be a file or a list"])
        if any(set(n) & set("*?[") for n in names):
            raise LmEvalTaskError(
                [f"{where}: data_files[{split!r}]: glob patterns are not supported; name files"]
            )
        files[str(split)] = names
    return files


def load_splits(
    fmt: str, files: dict[str, list[str]], where: Where, access: DataAccess, record: _Files
) -> dict[str, list[dict[str, Any]]]:
    """Each split's rows, read from files under the data roots (a relative name is read from
    the folder of the YAML that names it; lm-eval would read it from the working directory).

    Every row gets every column of its split, missing values as None, as datasets gives them.
    """
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, names in files.items():
        rows: list[dict[str, Any]] = []
        for name in names:
            candidate = Path(name).expanduser()
            candidate = candidate if candidate.is_absolute() else where.folder / candidate
            try:
                path = resolve_under(
                    str(candidate), access.roots, what="data file", env_var="FORGETGUARD_DATA_ROOTS"
                )
                data = read_client_file(
                    path,
                    repr(name),
                    access.budget,
                    max_bytes=access.max_bytes,
                    setting="FORGETGUARD_MAX_DATASET_BYTES",
                )
                rows.extend(READERS[fmt](data, repr(name)))
            except Problem as problem:
                raise LmEvalTaskError([f"{where}: {problem.detail}"]) from None
            except ValueError as exc:
                raise LmEvalTaskError([f"{where}: {exc}"]) from None
            record.data.append((split, Path(name).name, hashlib.sha256(data).hexdigest()))
        columns = list(dict.fromkeys(key for row in rows for key in row))
        splits[split] = [{key: row.get(key) for key in columns} for row in rows]
    return splits


# --------------------------------------------------------------------------- lm-eval's docs


class DocError(ValueError):
    """One document cannot be turned into an item; the message says why."""


@dataclass
class DocFunctions:
    """``doc_to_text``, ``doc_to_choice``, ``doc_to_target`` and ``description`` as lm-eval's
    ``ConfigurableTask`` evaluates them; ``features`` are the evaluation split's columns."""

    text: Any
    choice: Any
    target: Any
    description: Any
    features: list[str]
    templates: dict[str, Template]

    @classmethod
    def build(
        cls, config: dict[str, Any], features: list[str], where: dict[str, Where]
    ) -> DocFunctions:
        """Compile every template once; a syntax error names the key's line."""
        env = jinja_env()
        templates: dict[str, Template] = {}
        problems = []
        for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "description"):
            value = config.get(key)
            if not isinstance(value, str) or not value or value in features:
                continue  # a column (description: resolved per document, column first)
            try:
                templates[key] = env.from_string(value)
            except TemplateError as exc:
                problems.append(f"{where[key]}: {key} is not a valid Jinja template: {exc}")
        if problems:
            raise LmEvalTaskError(problems)
        return cls(
            text=config.get("doc_to_text"),
            choice=config.get("doc_to_choice"),
            target=config.get("doc_to_target"),
            description=config.get("description") or "",
            features=features,
            templates=templates,
        )

    def _render(self, key: str, doc: dict[str, Any]) -> str:
        try:
            return self.templates[key].render(**doc)
        except TemplateError as exc:
            raise DocError(f"{key}: {type(exc).__name__}: {exc}") from None
        except Exception as exc:  # a template calling a method that fails (list.index)
            raise DocError(f"{key}: {type(exc).__name__}: {exc}") from None

    def _digits(self, key: str, rendered: str) -> int:
        try:
            value = ast.literal_eval(rendered)
        except (ValueError, SyntaxError):
            raise DocError(
                f"{key} rendered {rendered!r}, which lm-eval cannot read either"
            ) from None
        return int(value)

    def doc_to_text(self, doc: dict[str, Any]) -> Any:
        """A string, or an int (lm-eval's multiple-input mode: the gold context's index)."""
        value = self.text
        if isinstance(value, int):
            return value
        if value in self.features:
            return doc[value]
        rendered = self._render("doc_to_text", doc)
        if rendered.isdigit() and self.choice is not None:
            return self._digits("doc_to_text", rendered)
        return rendered

    def doc_to_target(self, doc: dict[str, Any]) -> Any:
        """An int (index into the choices), a string (a choice), or a list (several golds)."""
        value = self.target
        if isinstance(value, int | list):
            return value
        if value in self.features:
            return doc[value]
        rendered = self._render("doc_to_target", doc)
        if rendered.isdigit() and self.choice is not None:
            return self._digits("doc_to_target", rendered)
        if len(rendered) >= 2 and rendered[0] == "[" and rendered[-1] == "]":
            try:
                return ast.literal_eval(rendered)
            except (SyntaxError, ValueError):
                return rendered
        return rendered

    def doc_to_choice(self, doc: dict[str, Any]) -> Any:
        """The choices: a column, a template rendering a Python list literal, or the YAML's own
        list (or a mapping's values)."""
        value = self.choice
        if isinstance(value, list):
            return value
        if isinstance(value, dict):
            return list(value.values())
        if value in self.features:
            return doc[value]
        rendered = self._render("doc_to_choice", doc)
        try:
            return ast.literal_eval(rendered)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DocError(
                f"doc_to_choice rendered {rendered[:200]!r}, which is not a Python list literal"
            ) from None

    def doc_description(self, doc: dict[str, Any]) -> Any:
        """lm-eval's ``resolve_field``: a column of the doc, else a template over it."""
        if not self.description:
            return ""
        if self.description in doc or "description" not in self.templates:
            return doc[self.description]
        return self._render("description", doc)


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DocError(f"{what} must be a list of strings, got {_short(value)}")
    if len(value) < 2:
        raise DocError(f"{what} has {len(value)} entries; a multiple-choice item needs two")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:120] + "…"


def _gold_index(gold: Any, n: int, what: str) -> int:
    if isinstance(gold, int) and 0 <= gold < n:
        return int(gold)
    raise DocError(f"{what} is {_short(gold)}, not an index into the {n} choices")


def doc_rendering(
    fns: DocFunctions, doc: dict[str, Any], multiple_input: bool
) -> tuple[int, Rendering]:
    """One document as lm-eval builds its requests: (gold index, the lm-eval rendering)."""
    description = fns.doc_description(doc)
    if not isinstance(description, str):
        raise DocError(f"description is {_short(description)}, not a string")
    text, target = fns.doc_to_text(doc), fns.doc_to_target(doc)
    choices = _strings(fns.doc_to_choice(doc), "doc_to_choice")
    if isinstance(target, list):
        raise DocError(
            f"doc_to_target is a list ({_short(target)}): several gold answers per item are "
            "not supported"
        )
    if multiple_input:
        # WinoGrande's mode: doc_to_text is the gold context's index, the choices are the
        # contexts and doc_to_target the shared continuation (partial scoring).
        gold = _gold_index(text, len(choices), "doc_to_text (multiple-input mode)")
        if not isinstance(target, str):
            raise DocError(f"doc_to_target is {_short(target)}; the continuation must be a string")
        return gold, Rendering(description=description, contexts=choices, continuation=target)
    if not isinstance(text, str):
        raise DocError(f"doc_to_text is {_short(text)}, not a string")
    if isinstance(target, str):
        if target not in choices:
            raise DocError(
                f"doc_to_target is {_short(target)}, which is not one of the choices "
                f"{_short(choices)} (lm-eval would score this item wrong whatever the model says)"
            )
        gold = choices.index(target)
    else:
        gold = _gold_index(target, len(choices), "doc_to_target")
    return gold, Rendering(description=description, context=text, choices=choices)


# --------------------------------------------------------------------------- the suite


_NAME_BAD = re.compile(r"[^a-z0-9._-]+")


def suite_name(task: str) -> str | None:
    """A task name as a forgetguard suite name (``arc_easy`` stays ``arc_easy``), or None."""
    name = _NAME_BAD.sub("-", task.lower()).strip("-._")[:100]
    return name if re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,99}", name) else None


def _category(doc: dict[str, Any], task: str) -> str:
    for key in ("category", "subject"):
        value = doc.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()[:100]
    return task[:100]


def _config(entries: Entries) -> tuple[dict[str, Any], dict[str, Where]]:
    return {k: v for k, (v, _) in entries.items()}, {k: w for k, (_, w) in entries.items()}


def _need_str(config: dict[str, Any], where: dict[str, Where], key: str, default: str) -> str:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise LmEvalTaskError([f"{where[key]}: {key} must be a string"])
    return value


def _metric(config: dict[str, Any], where: dict[str, Where]) -> Metric:
    listed = config.get("metric_list")
    if listed is None:
        names: list[str] = list(DEFAULT_METRICS)
    else:
        at = where["metric_list"]
        if not isinstance(listed, list) or not listed:
            raise LmEvalTaskError([f"{at}: metric_list must be a list of {{metric: NAME}}"])
        names, problems = [], []
        for entry in listed:
            if not isinstance(entry, dict) or not isinstance(entry.get("metric"), str):
                problems.append(f"{at}: every metric_list entry needs a metric name")
                continue
            name = entry["metric"]
            extra = {k: v for k, v in entry.items() if k != "metric"}
            if name not in METRICS:
                problems.append(
                    f"{at}: metric {name!r} is not supported; forgetguard reports "
                    f"{', '.join(METRICS)} for multiple-choice tasks"
                )
            elif (
                extra.get("aggregation", "mean") != "mean"
                or extra.get("higher_is_better", True) is not True
                or set(extra) - {"aggregation", "higher_is_better"}
            ):
                problems.append(
                    f"{at}: metric {name!r}: only aggregation: mean and higher_is_better: true "
                    "are supported"
                )
            names.append(name)
        if problems:
            raise LmEvalTaskError(problems)
    return next(m for m in METRIC_PREFERENCE if m in names)


def _output_type(config: dict[str, Any], where: dict[str, Where]) -> None:
    output_type = config.get("output_type")
    if output_type == "multiple_choice":
        return
    at = f"{where['output_type']}: " if "output_type" in where else ""
    if output_type is None:
        reason = (
            "output_type is not set, and lm-eval's default is generate_until, which forgetguard "
            "does not import yet"
        )
    elif output_type == "generate_until":
        reason = (
            "output_type generate_until is not supported yet: forgetguard's qa kind scores "
            "generations with its own prompt format and answer matching, not with lm-eval's "
            "generation_kwargs, filters and metrics, so its scores would not be lm-eval's"
        )
    elif output_type in ("loglikelihood", "loglikelihood_rolling"):
        reason = (
            f"output_type {output_type} is not supported yet: lm-eval reports greedy-match acc "
            "and perplexity over the target (or word/byte perplexity for rolling), which no "
            "forgetguard suite kind computes (the perplexity kind reports NLL per token)"
        )
    else:
        reason = f"output_type {output_type!r} is not an lm-eval output type"
    raise LmEvalTaskError([f"{at}{reason}; only multiple_choice tasks can be imported"])


def _split_key(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    return None if value is None else str(value)


def convert_task(
    path: Path, *, access: DataAccess, name: str | None = None, shown: str | None = None
) -> ChoiceBenchmark:
    """Read an lm-eval task YAML and its local data into a suite of kind ``mc_benchmark``.

    Raises :class:`LmEvalTaskError` listing every problem (file:line: what, and what to do).
    """
    shown = shown or path.name
    record = _Files()
    entries = load_entries(path, shown, record)
    problems = check_keys(entries)
    if problems:
        raise LmEvalTaskError(problems)
    config, where = _config(entries)
    _output_type(config, where)
    task = config.get("task")
    task = str(task) if task else path.stem
    suite = name or suite_name(task)
    if suite is None:
        raise LmEvalTaskError([f"{shown}: task {task!r} is not a valid suite name; pass --name"])

    # The data: local files only.
    fmt = config.get("dataset_path")
    if fmt not in LOCAL_FORMATS:
        at = where.get("dataset_path", Where(shown, 1, path.parent))
        raise LmEvalTaskError(
            [f"{at}: dataset_path {fmt!r} is not a local format; forgetguard reads local files "
             f"only: set dataset_path to one of {', '.join(LOCAL_FORMATS)} and "
             "dataset_kwargs.data_files (lm-eval's task guide, 'local datasets')"]
        )  # fmt: skip
    if config.get("dataset_name") is not None:
        raise LmEvalTaskError(
            [f"{where['dataset_name']}: dataset_name must be null for local files "
             f"(dataset_path: {fmt})"]
        )  # fmt: skip
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        at = where.get("dataset_kwargs", where["dataset_path"])
        raise LmEvalTaskError([f"{at}: dataset_kwargs.data_files must name the local file(s)"])
    unknown = sorted(set(kwargs) - {"data_files", "trust_remote_code"})
    if unknown:
        raise LmEvalTaskError(
            [f"{where['dataset_kwargs']}: dataset_kwargs {', '.join(unknown)} not supported "
             "(only data_files)"]
        )  # fmt: skip
    files = _data_files(kwargs["data_files"], where["dataset_kwargs"])

    # Which split is evaluated and which one the few-shot examples come from (lm-eval's
    # eval_docs and fewshot_docs).
    test, validation = _split_key(config, "test_split"), _split_key(config, "validation_split")
    training = _split_key(config, "training_split")
    fewshot_config = config.get("fewshot_config") or {}
    fs_where = where.get("fewshot_config")
    if not isinstance(fewshot_config, dict):
        raise LmEvalTaskError([f"{fs_where}: fewshot_config must be a mapping"])
    extra = sorted(
        k for k, v in fewshot_config.items() if k not in FEWSHOT_CONFIG_KEYS and v is not None
    )
    if extra:
        raise LmEvalTaskError(
            [f"{fs_where}: fewshot_config {', '.join(extra)} not supported (only sampler, split)"]
        )
    sampler_name = fewshot_config.get("sampler") or "default"
    if sampler_name not in SAMPLERS:
        raise LmEvalTaskError(
            [f"{fs_where}: fewshot_config.sampler {sampler_name!r} is not one of "
             f"{', '.join(SAMPLERS)}"]
        )  # fmt: skip
    fewshot_split = fewshot_config.get("split") or _split_key(config, "fewshot_split")
    eval_key = "test_split" if test is not None else "validation_split"
    evaluated = test if test is not None else validation
    if evaluated is None:
        raise LmEvalTaskError(
            [f"{shown}: neither test_split nor validation_split is set; lm-eval evaluates one "
             "of them"]
        )  # fmt: skip
    if fewshot_split is not None:
        pool_key = "fewshot_config" if fewshot_config.get("split") else "fewshot_split"
        pool_split = fewshot_split
    else:
        pool_key, pool_split = next(
            (k, s)
            for k, s in (("training_split", training), ("validation_split", validation),
                         ("test_split", test))
            if s is not None
        )  # fmt: skip
    for key, split, role in (
        (eval_key, evaluated, "evaluated"),
        (pool_key, pool_split, "the few-shot pool"),
    ):
        if split not in files:
            raise LmEvalTaskError(
                [f"{where[key]}: {key} {split!r} is {role}, but dataset_kwargs.data_files has no "
                 f"{split!r} (it has {', '.join(files)}); lm-eval would fail to load this task "
                 f"too: set {key} to one of those, or to null"]
            )  # fmt: skip
    num_fewshot = config.get("num_fewshot") or 0
    if not isinstance(num_fewshot, int) or not 0 <= num_fewshot <= MAX_FEWSHOT:
        raise LmEvalTaskError(
            [f"{where['num_fewshot']}: num_fewshot must be a whole number from 0 to {MAX_FEWSHOT}"]
        )
    target_delimiter = _need_str(config, where, "target_delimiter", " ")
    fewshot_delimiter = _need_str(config, where, "fewshot_delimiter", "\n\n")
    metric = _metric(config, where)
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
        if config.get(key) is None:
            raise LmEvalTaskError([f"{shown}: {key} is not set; a multiple_choice task needs it"])
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "description"):
        value = config.get(key)
        if value is not None and not isinstance(value, str | int | list | dict):
            raise LmEvalTaskError([f"{where[key]}: {key} must be a template or a field name"])

    needed = {evaluated: files[evaluated]}
    if num_fewshot:
        needed[pool_split] = files[pool_split]
    splits = load_splits(fmt, needed, where["dataset_kwargs"], access, record)
    docs = splits[evaluated]
    if not docs:
        raise LmEvalTaskError([f"{where[eval_key]}: split {evaluated!r} has no documents"])
    fns = DocFunctions.build(config, list(docs[0]), where)

    # lm-eval decides the multiple-input mode from the first evaluated document only.
    try:
        multiple_input = isinstance(fns.doc_to_text(docs[0]), int)
    except (DocError, KeyError):
        multiple_input = False

    def items(split: str, rows: list[dict[str, Any]]) -> list[ChoiceItem]:
        converted, problems = [], []
        for index, doc in enumerate(rows):
            try:
                gold, rendering = doc_rendering(fns, doc, multiple_input)
                converted.append(
                    ChoiceItem(
                        id=str(index),
                        category=_category(doc, task),
                        gold=gold,
                        renderings={CONVENTION: rendering},
                    )
                )
            except (DocError, ValidationError) as exc:
                reason = (
                    "; ".join(e["msg"] for e in exc.errors())
                    if isinstance(exc, ValidationError)
                    else str(exc)
                )
                problems.append(f"{shown}: split {split!r}, document {index}: {reason}")
            except KeyError as exc:
                problems.append(f"{shown}: split {split!r}, document {index}: no field {exc}")
            if len(problems) >= MAX_ERRORS:
                problems.append(f"{shown}: stopped after {MAX_ERRORS} documents that fail")
                break
        if problems:
            raise LmEvalTaskError(problems)
        return converted

    suite_items = items(evaluated, docs)
    fewshot = None
    if num_fewshot:
        # lm-eval removes the evaluated document from its draws only when fewshot_split equals
        # test_split (both unset included); an empty pool means exactly that here. Any other
        # pool is carried whole, the evaluated split's too (lm-eval may then draw the very
        # document it asks).
        removes_eval_doc = fewshot_split == test
        own = pool_split == evaluated and removes_eval_doc
        pool = [] if own else items(pool_split, splits[pool_split])
        fewshot = Fewshot(split=pool_split, sampler=SAMPLERS[sampler_name], items=pool)  # type: ignore[arg-type]

    read_from = ", ".join(f"{n} (sha256 {h})" for n, h in record.yaml)
    data = ", ".join(f"{s}: {n} (sha256 {h})" for s, n, h in record.data)
    description = (
        f"lm-eval task {task!r} imported from {read_from}; evaluated on split {evaluated!r}; "
        f"data: {data}"
    )
    try:
        return ChoiceBenchmark(
            name=suite,
            description=description,
            conventions={
                CONVENTION: ConventionSpec(
                    target_delimiter=target_delimiter,
                    fewshot_delimiter=fewshot_delimiter,
                    metric=metric,
                )
            },
            default_convention=CONVENTION,
            num_fewshot=num_fewshot,
            fewshot=fewshot,
            items=suite_items,
        )
    except ValidationError as exc:
        raise LmEvalTaskError(
            [
                f"{shown}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in exc.errors()[:MAX_ERRORS]
            ]
        ) from None
