"""lm-eval task YAML -> ChoiceBenchmark (app.suites.lmeval_tasks), and `suites import --lm-eval`.

Every expected text below is what lm-eval 0.4.13 builds for the same task and document
(``ConfigurableTask.fewshot_context`` + ``construct_requests``); benchmarks/lmeval/
check_import.py compares the two on real tasks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.core.clientfiles import ReadBudget
from app.suites.lmeval_tasks import DataAccess, LmEvalTaskError, convert_task
from tests.conftest import REPO

ARC_DOCS = [
    {
        "question": "What is 2 + 2?",
        "choices": {"text": ["3", "4", "5"], "label": ["A", "B", "C"]},
        "answerKey": "B",
        "subject": "math",
    },
    {
        "question": "What colour is the sky?",
        "choices": {"text": ["blue", "green"], "label": ["1", "2"]},
        "answerKey": "1",
        "subject": "nature",
    },
]
ARC_TRAIN = [
    {
        "question": "What is 1 + 1?",
        "choices": {"text": ["2", "7"], "label": ["A", "B"]},
        "answerKey": "A",
        "subject": "math",
    }
]
ARC_YAML = """\
task: tiny_arc
tag:
  - ai2_arc
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: data/test.jsonl
    train: data/train.jsonl
output_type: multiple_choice
training_split: train
validation_split: null
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
should_decontaminate: true
doc_to_decontamination_query: "Question: {{question}}\\nAnswer:"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _access(*roots: Path) -> DataAccess:
    return DataAccess(roots=[r.resolve() for r in roots], max_bytes=10**7, budget=ReadBudget())


@pytest.fixture
def arc(tmp_path: Path) -> Path:
    _jsonl(tmp_path / "data" / "test.jsonl", ARC_DOCS)
    _jsonl(tmp_path / "data" / "train.jsonl", ARC_TRAIN)
    task = tmp_path / "tiny_arc.yaml"
    task.write_text(ARC_YAML, encoding="utf-8")
    return task


def _convert(task: Path, **kwargs: Any) -> Any:
    return convert_task(task, access=_access(task.parent), **kwargs)


def _refusal(task: Path, text: str, roots: list[Path] | None = None) -> str:
    task.write_text(text, encoding="utf-8")
    with pytest.raises(LmEvalTaskError) as caught:
        convert_task(task, access=_access(*(roots or [task.parent])))
    return str(caught.value)


def test_arc_style_task_becomes_one_lm_eval_rendering_per_item(arc: Path) -> None:
    suite = _convert(arc)
    assert suite.kind == "mc_benchmark" and suite.name == "tiny_arc"
    assert suite.default_convention == "lm-eval" and list(suite.conventions) == ["lm-eval"]
    spec = suite.conventions["lm-eval"]
    # acc and acc_norm listed: the suite reports acc_norm, as the pulled ARC suites do.
    assert (spec.target_delimiter, spec.fewshot_delimiter, spec.metric) == (" ", "\n\n", "acc_norm")
    first, second = suite.items
    assert (first.id, first.category, first.gold) == ("0", "math", 1)
    rendering = first.renderings["lm-eval"]
    assert rendering.context == "Question: What is 2 + 2?\nAnswer:"
    assert rendering.choices == ["3", "4", "5"] and rendering.description == ""
    # "{{choices.label.index(answerKey)}}" renders "0": a digit string is an index.
    assert (second.id, second.category, second.gold) == ("1", "nature", 0)
    assert suite.num_fewshot == 0 and suite.fewshot is None
    assert "tiny_arc.yaml (sha256 " in suite.description
    assert "test: test.jsonl (sha256 " in suite.description


def test_few_shot_pool_is_the_training_split_drawn_as_lm_eval_draws(arc: Path) -> None:
    arc.write_text(ARC_YAML + "num_fewshot: 1\n", encoding="utf-8")
    suite = _convert(arc)
    assert suite.num_fewshot == 1 and suite.fewshot_seed == 1234
    assert suite.fewshot.split == "train" and suite.fewshot.sampler == "random"
    [example] = suite.fewshot.items
    assert example.gold == 0 and example.renderings["lm-eval"].choices == ["2", "7"]


def test_few_shot_from_the_evaluated_split_is_the_suites_own_items(arc: Path) -> None:
    # fewshot_split == test_split: lm-eval removes the asked document from its draws, which an
    # empty pool means; sampler first_n keeps lm-eval's name.
    arc.write_text(
        ARC_YAML + "num_fewshot: 1\nfewshot_split: test\nfewshot_config:\n  sampler: first_n\n",
        encoding="utf-8",
    )
    suite = _convert(arc)
    assert suite.fewshot.split == "test" and suite.fewshot.items == []
    assert suite.fewshot.sampler == "first_n"


def test_description_target_and_choices_as_lm_eval_reads_them(tmp_path: Path) -> None:
    # sciq's list-literal template, a constant target index, a per-document description with
    # lm-eval's regex_replace filter and both delimiters.
    _jsonl(
        tmp_path / "sciq.jsonl",
        [
            {
                "support": "  Water boils at 100 C.",
                "question": "When does water boil?",
                "distractor1": "0 C",
                "distractor2": "50 C",
                "distractor3": "10 C",
                "correct_answer": "100 C",
                "topic": "physics_101",
            }
        ],
    )
    task = tmp_path / "sciq.yaml"
    task.write_text(
        """\
task: Sci Q!
dataset_path: json
dataset_kwargs:
  data_files: sciq.jsonl
output_type: multiple_choice
test_split: train
doc_to_text: "{{support.lstrip()}}\\nQuestion: {{question}}\\nAnswer:"
doc_to_target: 3
doc_to_choice: "{{[distractor1, distractor2, distractor3, correct_answer]}}"
description: "Topic: {{topic | regex_replace('_[0-9]+$', '')}}\\n\\n"
target_delimiter: ":"
fewshot_delimiter: "\\n###\\n"
metric_list:
  - metric: acc
""",
        encoding="utf-8",
    )
    suite = _convert(task)
    assert suite.name == "sci-q"  # the task name made a suite name
    [item] = suite.items
    rendering = item.renderings["lm-eval"]
    assert rendering.context == "Water boils at 100 C.\nQuestion: When does water boil?\nAnswer:"
    assert rendering.choices == ["0 C", "50 C", "10 C", "100 C"] and item.gold == 3
    assert rendering.description == "Topic: physics\n\n"
    assert item.category == "Sci Q!"  # no category or subject column: the task name
    spec = suite.conventions["lm-eval"]
    assert (spec.target_delimiter, spec.fewshot_delimiter, spec.metric) == (":", "\n###\n", "acc")


def test_csv_columns_are_typed_as_pandas_types_them(tmp_path: Path) -> None:
    # piqa's bare-field target: an int column in lm-eval (datasets reads CSV with pandas), so it
    # must be an int here too; "NA" is missing, as pandas reads it.
    (tmp_path / "piqa.csv").write_text(
        'goal,sol1,sol2,label,note\n"Open a jar, fast",twist the lid,smash it,0,NA\n'
        "Dry a phone,rice,microwave,1,ok\n",
        encoding="utf-8",
    )
    task = tmp_path / "piqa.yaml"
    task.write_text(
        """\
task: piqa_local
dataset_path: csv
dataset_kwargs: {data_files: {validation: piqa.csv}}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{goal}}\\nAnswer:{% if note is none %} (no note){% endif %}"
doc_to_target: label
doc_to_choice: "{{[sol1, sol2]}}"
""",
        encoding="utf-8",
    )
    suite = _convert(task)
    assert [i.gold for i in suite.items] == [0, 1]
    assert suite.items[0].renderings["lm-eval"].context == (
        "Question: Open a jar, fast\nAnswer: (no note)"
    )
    # No metric_list: lm-eval's default for multiple_choice lists acc and acc_norm.
    assert suite.conventions["lm-eval"].metric == "acc_norm"


def test_choices_written_in_the_yaml_and_a_string_target(tmp_path: Path) -> None:
    _jsonl(
        tmp_path / "d.jsonl", [{"q": "Is ice cold?", "a": "yes"}, {"q": "Fire cold?", "a": "no"}]
    )
    task = tmp_path / "t.yaml"
    task.write_text(
        "task: yn\ndataset_path: json\ndataset_kwargs: {data_files: {test: d.jsonl}}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\n"
        "doc_to_target: a\ndoc_to_choice: {0: 'no', 1: 'yes'}\n",
        encoding="utf-8",
    )
    suite = _convert(task)
    # doc_to_text names a column; the target string is looked up among the mapping's values.
    assert suite.items[0].renderings["lm-eval"].context == "Is ice cold?"
    assert suite.items[0].renderings["lm-eval"].choices == ["no", "yes"]
    assert [i.gold for i in suite.items] == [1, 0]


def test_winogrande_style_multiple_input_becomes_partial_scoring(tmp_path: Path) -> None:
    _jsonl(
        tmp_path / "wino.jsonl",
        [
            {
                "sentence": "The cup fell off the table because _ was wobbly.",
                "option1": "the cup",
                "option2": "the table",
                "answer": "2",
            }
        ],
    )
    task = tmp_path / "wino.yaml"
    task.write_text(
        """\
task: wino_jinja
dataset_path: json
dataset_kwargs: {data_files: {validation: wino.jsonl}}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{ {'1': 0, '2': 1}[answer] }}"
doc_to_choice: "{% set i = sentence.index('_') %}\\
  {{ [sentence[:i] + option1, sentence[:i] + option2] }}"
doc_to_target: "{{ sentence[sentence.index('_') + 1:].strip() }}"
metric_list: [{metric: acc}]
""",
        encoding="utf-8",
    )
    [item] = _convert(task).items
    rendering = item.renderings["lm-eval"]
    assert item.gold == 1 and rendering.context is None and rendering.choices is None
    assert rendering.contexts == [
        "The cup fell off the table because the cup",
        "The cup fell off the table because the table",
    ]
    assert rendering.continuation == "was wobbly."


def test_an_include_is_merged_and_its_function_can_be_overridden(arc: Path) -> None:
    # lm-eval's hellaswag.yaml style: the included file has process_docs: !function; the
    # including file sets it to null, so nothing of it is used.
    base = arc.parent / "_base.yaml"
    base.write_text(
        ARC_YAML.replace("task: tiny_arc\n", "task: base\n")
        + "process_docs: !function utils.process_docs\n",
        encoding="utf-8",
    )
    arc.write_text("include: _base.yaml\ntask: mine\nprocess_docs: null\n", encoding="utf-8")
    suite = _convert(arc)
    assert suite.name == "mine" and len(suite.items) == 2
    assert "_base.yaml (sha256 " in suite.description


def test_arrow_data_is_read_with_forgetguards_own_reader(tmp_path: Path) -> None:
    shutil.copy(REPO / "tests" / "suites" / "data" / "columns.arrow", tmp_path / "c.arrow")
    task = tmp_path / "arrow.yaml"
    task.write_text(
        """\
task: arrow_task
dataset_path: arrow
dataset_kwargs: {data_files: {test: c.arrow}}
output_type: multiple_choice
test_split: test
doc_to_text: "{{text}} {{i64}}"
doc_to_target: "{{u8 % 2}}"
doc_to_choice: ["odd", "even"]
""",
        encoding="utf-8",
    )
    items = _convert(task).items
    assert [i.renderings["lm-eval"].context for i in items] == [
        "héllo ✓ -1099511627776",
        "None 7",
        " 0",
    ]
    assert [i.gold for i in items] == [1, 0, 1]


def test_parquet_needs_pyarrow_and_says_so(tmp_path: Path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pyarrow is installed here; test_parquet_is_read_with_pyarrow covers it")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    message = _refusal(
        tmp_path / "p.yaml",
        "task: p\ndataset_path: parquet\ndataset_kwargs: {data_files: {test: d.parquet}}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_target: 0\n"
        "doc_to_choice: [a, b]\n",
    )
    assert message.startswith("p.yaml:3: 'd.parquet': reading Parquet needs pyarrow")


def test_parquet_is_read_with_pyarrow(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"q": "Q?", "g": 1}]), tmp_path / "d.parquet")
    task = tmp_path / "p.yaml"
    task.write_text(
        "task: p\ndataset_path: parquet\ndataset_kwargs: {data_files: {test: d.parquet}}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_target: g\n"
        "doc_to_choice: [a, b]\n",
        encoding="utf-8",
    )
    assert _convert(task).items[0].gold == 1


def test_function_tags_and_unsupported_keys_are_refused_naming_their_lines(arc: Path) -> None:
    message = _refusal(
        arc,
        ARC_YAML.replace(
            'doc_to_text: "Question: {{question}}\\nAnswer:"',
            "doc_to_text: !function utils.doc_to_text",
        )
        + "process_docs: !function utils.process_docs\n"
        + "gen_prefix: 'Answer:'\n"
        + "class: !function mytask.MyTask\n"
        + "frobnicate: 3\n",
    )
    lines = message.splitlines()
    assert lines[0].startswith(
        "tiny_arc.yaml:14: doc_to_text: !function utils.doc_to_text is Python code"
    )
    assert lines[1].startswith("tiny_arc.yaml:28: process_docs: !function utils.process_docs")
    assert lines[2].startswith("tiny_arc.yaml:29: gen_prefix is not supported")
    assert lines[3].startswith("tiny_arc.yaml:30: class: !function mytask.MyTask")
    assert lines[4].startswith("tiny_arc.yaml:31: unknown key 'frobnicate'")
    assert len(lines) == 5


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("output_type: multiple_choice", "output_type: generate_until"),
            "tiny_arc.yaml:10: output_type generate_until is not supported yet",
        ),
        (
            ("output_type: multiple_choice", "output_type: loglikelihood"),
            "tiny_arc.yaml:10: output_type loglikelihood is not supported yet",
        ),
        (
            ("output_type: multiple_choice\n", ""),
            "output_type is not set, and lm-eval's default is generate_until",
        ),
        (
            ("dataset_path: json", "dataset_path: allenai/ai2_arc"),
            "tiny_arc.yaml:4: dataset_path 'allenai/ai2_arc' is not a local format",
        ),
        (
            ("dataset_name: null", "dataset_name: ARC-Easy"),
            "tiny_arc.yaml:5: dataset_name must be null",
        ),
        (
            ("  - metric: acc\n", "  - metric: f1\n"),
            "tiny_arc.yaml:19: metric 'f1' is not supported",
        ),
        (
            ("training_split: train", "training_split: dev"),
            "tiny_arc.yaml:11: training_split 'dev' is the few-shot pool, but "
            "dataset_kwargs.data_files has no 'dev'",
        ),
        (
            ("{{choices.text}}", "{{choices.text"),
            "tiny_arc.yaml:16: doc_to_choice is not a valid Jinja template",
        ),
        (
            ("{{choices.label.index(answerKey)}}", "{{answerKey}}"),
            "split 'test', document 0: doc_to_target is 'B', which is not one of the choices",
        ),
        (
            ("{{choices.label.index(answerKey)}}", "{{[0, 1]}}"),
            "document 0: doc_to_target is a list ([0, 1]): several gold answers",
        ),
        (
            ("{{choices.text}}", "{{ ''.__class__.__mro__ }}"),
            "document 0: doc_to_choice: SecurityError",
        ),
        (
            ("{{choices.text}}", "{{ choices.text.append('x') }}"),
            "document 0: doc_to_choice: SecurityError",
        ),
        (("tag:\n", "group: g\ntag:\n"), "tiny_arc.yaml:2: group: this is a group of tasks"),
    ],
)
def test_what_cannot_be_reproduced_is_refused_with_its_line(
    arc: Path, change: tuple[str, str], expected: str
) -> None:
    assert change[0] in ARC_YAML
    assert expected in _refusal(arc, ARC_YAML.replace(*change, 1))


def test_data_outside_the_roots_and_non_local_includes_are_refused(
    arc: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "roots"
    elsewhere.mkdir()
    outside = _refusal(arc, ARC_YAML, roots=[elsewhere])
    assert outside.startswith("tiny_arc.yaml:6: data file path")
    assert "outside the allowed roots" in outside and "FORGETGUARD_DATA_ROOTS" in outside
    remote = _refusal(arc, "include: https://example.org/arc.yaml\ntask: x\n")
    assert remote.startswith("tiny_arc.yaml:1: include 'https://example.org/arc.yaml' is not a")
    missing = _refusal(arc, "task: x\ninclude: arc_easy.yaml\n")
    assert missing.startswith("tiny_arc.yaml:2: include 'arc_easy.yaml' is not a file")
    (arc.parent / "loop.yaml").write_text("include: tiny_arc.yaml\n", encoding="utf-8")
    assert "include cycle" in _refusal(arc, "include: loop.yaml\n")


# ----------------------------------------------------------------------------- the command


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    environ = {k: v for k, v in os.environ.items() if k != "FORGETGUARD_URL"}
    environ.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "suites", "import", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )


def test_cli_refuses_a_bad_task_before_reaching_any_server(arc: Path) -> None:
    from tests.conftest import free_port

    arc.write_text(ARC_YAML + "process_docs: !function utils.process_docs\n", encoding="utf-8")
    stopped = {
        "FORGETGUARD_URL": f"http://127.0.0.1:{free_port()}",
        "FORGETGUARD_DATA_ROOTS": str(arc.parent),
    }
    result = _cli("--lm-eval", arc.name, cwd=arc.parent, env=stopped)
    assert result.returncode == 2
    # The task's problem, not "cannot reach the server": nothing was sent.
    assert result.stderr.startswith("error: tiny_arc.yaml:28: process_docs: !function")
    assert "Traceback" not in result.stderr
    both = _cli("x.json", "--lm-eval", arc.name, cwd=arc.parent, env=stopped)
    assert both.returncode == 2 and "name one suite file, or an lm-eval task" in both.stderr


def test_cli_imports_the_task_and_it_is_evaluated(settings, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.ui.live import serve
    from workers.main import Worker

    data = settings.data_roots[0]
    _jsonl(data / "data" / "test.jsonl", ARC_DOCS)
    _jsonl(data / "data" / "train.jsonl", ARC_TRAIN)
    (data / "tiny_arc.yaml").write_text(ARC_YAML + "num_fewshot: 1\n", encoding="utf-8")
    env = {"FORGETGUARD_DATA_ROOTS": str(data)}
    with serve(create_app(settings)) as base:
        first = _cli("--lm-eval", "tiny_arc.yaml", "--server", base, cwd=data, env=env)
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == "tiny_arc version 1 (created, 2 items)"
        again = _cli("--lm-eval", "tiny_arc.yaml", "--server", base, cwd=data, env=env)
        assert again.stdout.strip() == "tiny_arc version 1 (unchanged, 2 items)"
    with TestClient(create_app(settings)) as client:
        created = client.post(
            "/evaluations",
            json={"model": {"path": str(tiny_model_dir)}, "suites": ["tiny_arc"], "cache": False},
        )
        assert created.status_code == 202, created.text
        worker = Worker(client.app.state.settings, device="cpu", once=True, worker_id="inproc")
        assert worker.run() == 0
        evaluation = client.get(f"/evaluations/{created.json()['id']}").json()
        assert evaluation["status"] == "succeeded", evaluation["error"]
        items = client.get(f"/evaluations/{evaluation['id']}/items?suite=tiny_arc").json()
        assert len(items["data"]) == 2
