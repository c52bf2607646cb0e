"""Hostile input (issue 8): every request below is refused with a 4xx problem+json, nothing
answers 5xx, the server stays healthy, and not one evaluation, item, job or suite is created."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select

from app.core.config import Settings
from app.core.tables import Claim, Evaluation, EvaluationItem, FinetuneJob, Suite
from app.main import JSON_MAX_DEPTH, JsonNesting, create_app

BODY_LIMIT = 2 * 1024 * 1024
DATASET_LIMIT = 64 * 1024
PROBLEM_KEYS = {"type", "title", "status", "detail"}


@dataclass
class Env:
    """The file system a hostile request is built against."""

    root: Path  # an allowed model root
    outside: Path  # a perfectly good model, outside every root
    tiny: Path  # a good model inside a root
    data: Path  # the allowed data root

    def dataset(self, name: str, content: bytes) -> str:
        """Write a file under the data root; its path as a client would send it."""
        (self.data / name).write_bytes(content)
        return str(self.data / name)


@pytest.fixture
def env(tmp_path: Path, tiny_model_dir: Path) -> Env:
    root = tmp_path / "models"
    root.mkdir(exist_ok=True)
    outside = tmp_path / "outside" / "model"
    shutil.copytree(tiny_model_dir, outside)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return Env(root=root, outside=outside, tiny=tiny_model_dir, data=data)


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    """A client on an app with a small body limit (so an oversized body is cheap to send)."""
    small = settings.model_copy(
        update={"max_body_bytes": BODY_LIMIT, "max_dataset_bytes": DATASET_LIMIT}
    )
    with TestClient(create_app(small)) as client:
        yield client


def evaluation(path: str, **extra: Any) -> dict[str, Any]:
    return {"model": {"path": path}, "suites": ["forgetting-checklist"], **extra}


def qa_suite(name: str = "mine", items: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    default = [{"id": "q1", "question": "Capital of France?", "answers": ["Paris"]}]
    return {"name": name, "kind": "qa", "items": items or default}


def model_in_root(env: Env, name: str) -> Path:
    return Path(shutil.copytree(env.tiny, env.root / name))


def _symlink_out(env: Env) -> Path:
    link = env.root / "escape"
    link.symlink_to(env.outside, target_is_directory=True)
    return link


def _symlinked_weights(env: Env) -> Path:
    model = model_in_root(env, "m")
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(env.outside / "model.safetensors")
    return model


def _pickle_only(env: Env) -> Path:
    model = env.root / "pickled"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    return model


def _auto_map(env: Env) -> Path:
    model = model_in_root(env, "remote")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text("raise SystemExit('pwned')\n")
    return model


def _adapter_auto_map(env: Env) -> Path:
    adapter = env.root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "auto_map": {"AutoModel": "evil.Evil"}})
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    return adapter


def _chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * size
        sent += size


def _nested(depth: int) -> str:
    check: dict[str, Any] = {"type": "contains", "value": "x"}
    for _ in range(depth):
        check = {"not": check}
    suite = {
        "name": "deep",
        "kind": "checklist",
        "items": [{"id": "a", "test": "t", "prompt": "p", "check": check}],
    }
    return json.dumps(suite)


JSON = {"content-type": "application/json"}
Request = tuple[str, str, dict[str, Any], int]


def post(url: str, expected: int, **kwargs: Any) -> Request:
    return ("POST", url, kwargs, expected)


def get(url: str, expected: int) -> Request:
    return ("GET", url, {}, expected)


def raw(url: str, expected: int, content: Any) -> Request:
    return ("POST", url, {"content": content, "headers": JSON}, expected)


def items(count: int, **fields: Any) -> list[dict[str, Any]]:
    return [{"id": f"q{i}", "question": "q", "answers": ["a"], **fields} for i in range(count)]


EXEC_CHECK = {"id": "a", "test": "t", "prompt": "p", "check": {"type": "exec", "value": "rm"}}
SQL = "'; DROP TABLE evaluations;--"

# name → (method, url, request kwargs, expected status), built against the test's file system.
CASES: dict[str, Callable[[Env], Request]] = {
    # paths: resolved, then required under a root (403) and loadable (422)
    "path-traversal": lambda e: post("/evaluations", 403, json=evaluation(f"{e.root}/../../etc")),
    "relative-path-traversal": lambda e: post("/evaluations", 403, json=evaluation("../" * 8)),
    "absolute-path-outside": lambda e: post("/evaluations", 403, json=evaluation(str(e.outside))),
    "symlink-in-root-pointing-out": lambda e: post(
        "/evaluations", 403, json=evaluation(str(_symlink_out(e)))
    ),
    "symlinked-weights-pointing-out": lambda e: post(
        "/evaluations", 403, json=evaluation(str(_symlinked_weights(e)))
    ),
    "adapter-outside-roots": lambda e: post(
        "/evaluations", 403, json={"model": {"path": str(e.tiny), "adapter_path": "/etc"}}
    ),
    "nul-byte-in-path": lambda e: post(
        "/evaluations", 422, json=evaluation(f"{e.tiny}\x00/etc/passwd")
    ),
    "overlong-path-component": lambda e: post(
        "/evaluations", 422, json=evaluation(str(e.root / ("a" * 300)))
    ),
    # weights and code
    "pickle-only-weights": lambda e: post(
        "/evaluations", 422, json=evaluation(str(_pickle_only(e)))
    ),
    "config-with-auto-map": lambda e: post("/evaluations", 422, json=evaluation(str(_auto_map(e)))),
    "adapter-with-auto-map": lambda e: post(
        "/evaluations",
        422,
        json={"model": {"path": str(e.tiny), "adapter_path": str(_adapter_auto_map(e))}},
    ),
    "unknown-check-type": lambda e: post(
        "/suites", 422, json={"name": "c", "kind": "checklist", "items": [EXEC_CHECK]}
    ),
    # bodies
    "oversized-body": lambda e: raw("/suites", 413, b" " * (BODY_LIMIT + 1)),
    "oversized-chunked-body": lambda e: raw("/evaluations", 413, _chunks(BODY_LIMIT + 1)),
    "malformed-json": lambda e: raw("/evaluations", 422, b'{"model": {"path": '),
    "not-utf8-json": lambda e: raw("/suites", 400, b'{"name": "\xff\xfe"}'),
    "json-array-instead-of-object": lambda e: post("/evaluations", 422, json=[1, 2, 3]),
    "deeply-nested-json": lambda e: raw("/suites", 422, _nested(JSON_MAX_DEPTH * 4)),
    "brackets-nested-past-the-parser": lambda e: raw("/suites", 422, b"[" * 200_000),
    "mass-assignment-of-status": lambda e: post(
        "/evaluations", 422, json=evaluation(str(e.tiny), status="succeeded")
    ),
    # limits
    "max-new-tokens-1e9": lambda e: post(
        "/evaluations", 422, json=evaluation(str(e.tiny), generation={"max_new_tokens": 10**9})
    ),
    "max-new-tokens-negative": lambda e: post(
        "/evaluations", 422, json=evaluation(str(e.tiny), generation={"max_new_tokens": -1})
    ),
    "text-field-over-8-KiB": lambda e: post(
        "/suites", 422, json=qa_suite(items=items(1, question="x" * 8193))
    ),
    "suite-over-10000-items": lambda e: post("/suites", 422, json=qa_suite(items=items(10_001))),
    "too-many-suites": lambda e: post(
        "/evaluations", 422, json={"model": {"path": str(e.tiny)}, "suites": ["s"] * 21}
    ),
    "negative-page-size": lambda e: get("/evaluations?limit=-1", 422),
    "zero-page-size": lambda e: get("/suites?limit=0", 422),
    "huge-page-size": lambda e: get("/evaluations?limit=1000000000", 422),
    "negative-item-page-size": lambda e: get("/evaluations/ev_x/items?limit=-5", 422),
    "forged-cursor": lambda e: get("/evaluations?cursor=%27%20OR%201%3D1--", 422),
    # SQL-looking strings: parameters, never SQL
    "sql-in-suite-name": lambda e: post("/suites", 422, json=qa_suite(name=f"x{SQL}")),
    "sql-in-suite-reference": lambda e: post(
        "/evaluations", 422, json={"model": {"path": str(e.tiny)}, "suites": [f"general-qa{SQL}"]}
    ),
    "sql-in-path-outside-roots": lambda e: post(
        "/evaluations", 403, json=evaluation(f"/tmp/x{SQL}")
    ),
    # under ./models, a root in the test settings, but no such directory
    "sql-in-model-path-and-label": lambda e: post(
        "/evaluations", 422, json=evaluation(f"models/x{SQL}", label=f"'){SQL}")
    ),
    "sql-in-suite-path": lambda e: get("/suites/x%27%3B%20DROP%20TABLE%20suites%3B--", 404),
    "sql-in-evaluation-id": lambda e: get("/evaluations/1%27%20OR%20%271%27%3D%271", 404),
    "sql-in-cancel-id": lambda e: post("/evaluations/x%27%3B%20DELETE%20FROM%20x--/cancel", 404),
    "sql-in-compare-ids": lambda e: get("/compare?before=%27%20OR%201%3D1--&after=x", 404),
}


def finetune(e: Env, **fields: Any) -> dict[str, Any]:
    """A fine-tune request that is valid except for what ``fields`` change."""
    return {
        "base_model": {"path": str(e.tiny)},
        "method": "lora",
        "dataset": {"examples": [{"text": "Q: What is aspirin?\nA: An NSAID."}]},
        **fields,
    }


def _data_link_out(e: Env) -> str:
    (e.data / "link.jsonl").symlink_to("/etc/passwd")
    return str(e.data / "link.jsonl")


FINETUNE_CASES: dict[str, Callable[[Env], Request]] = {
    "dataset-path-traversal": lambda e: post(
        "/finetune-jobs", 403, json=finetune(e, dataset={"path": f"{e.data}/../../etc/passwd"})
    ),
    "dataset-symlink-pointing-out": lambda e: post(
        "/finetune-jobs", 403, json=finetune(e, dataset={"path": _data_link_out(e)})
    ),
    "replay-path-outside-roots": lambda e: post(
        "/finetune-jobs", 403, json=finetune(e, replay={"path": "/etc/passwd"})
    ),
    "dataset-not-utf8": lambda e: post(
        "/finetune-jobs", 422, json=finetune(e, dataset={"path": e.dataset("b.jsonl", b"\xff\n")})
    ),
    "dataset-nested-too-deeply": lambda e: post(
        "/finetune-jobs",
        422,
        json=finetune(e, dataset={"path": e.dataset("d.jsonl", b"[" * 10**5)}),
    ),
    "dataset-over-the-size-limit": lambda e: post(
        "/finetune-jobs",
        422,
        json=finetune(
            e, dataset={"path": e.dataset("big.jsonl", b'{"text": "x"}\n' * DATASET_LIMIT)}
        ),
    ),
    "finetune-base-model-pickle-only": lambda e: post(
        "/finetune-jobs", 422, json=finetune(e, base_model={"path": str(_pickle_only(e))})
    ),
    "finetune-base-model-outside-roots": lambda e: post(
        "/finetune-jobs", 403, json=finetune(e, base_model={"path": str(e.outside)})
    ),
    "finetune-unknown-hyperparameter": lambda e: post(
        "/finetune-jobs", 422, json=finetune(e, hyperparameters={"trust_remote_code": True})
    ),
    "finetune-negative-page-size": lambda e: get("/finetune-jobs?limit=-1", 422),
    "finetune-sql-in-id": lambda e: get("/finetune-jobs/x%27%20OR%20%271%27%3D%271", 404),
}
CASES.update(FINETUNE_CASES)

SECRET = "TOP-SECRET-CONTENT-42"


def _nested_link_out(e: Env, folder: str, name: str) -> Path:
    """A good model whose ``folder/name`` (a chat template, say) links to a file outside."""
    model = model_in_root(e, f"nested-{folder.replace('/', '-')}")
    secret = e.outside.parent / "secret.jinja"
    secret.write_text(SECRET)
    (model / folder).mkdir(parents=True, exist_ok=True)
    (model / folder / name).symlink_to(secret)
    return model


def _folder_link_out(e: Env) -> Path:
    """A model whose subfolder links to a directory outside the roots."""
    model = model_in_root(e, "folder-link")
    (model / "extra").mkdir()
    (model / "extra" / "templates").symlink_to(e.outside, target_is_directory=True)
    return model


def _more_layers_than_weights(e: Env) -> Path:
    model = model_in_root(e, "inflated")
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 100_000
    (model / "config.json").write_text(json.dumps(config))
    return model


def _checklist(check: dict[str, Any], name: str = "c") -> dict[str, Any]:
    return {
        "name": name,
        "kind": "checklist",
        "items": [{"id": "a", "test": "t", "prompt": "p", "check": check}],
    }


def _raw_finetune(e: Env, threshold: str) -> bytes:
    body = json.dumps(finetune(e, evaluation={"suites": ["general-qa"], "threshold": 0.5}))
    return body.replace('"threshold": 0.5', f'"threshold": {threshold}').encode()


def _encoded(e: Env, encoding: str) -> bytes:
    return json.dumps(evaluation(str(e.tiny))).encode(encoding)


# Issue 16: built-in names are reserved everywhere, containment covers every file, cost is
# decided before work, and nothing the database cannot store reaches it.
ROUND_TWO: dict[str, Callable[[Env], Request]] = {
    "inline-suite-named-like-a-builtin": lambda e: post(
        "/evaluations",
        422,
        json={"model": {"path": str(e.tiny)}, "suites": [qa_suite(name="general-qa")]},
    ),
    "inline-checklist-named-like-the-default": lambda e: post(
        "/evaluations",
        422,
        json={
            "model": {"path": str(e.tiny)},
            "suites": [_checklist({"type": "contains", "value": "x"}, "forgetting-checklist")],
        },
    ),
    "finetune-inline-suite-named-like-a-builtin": lambda e: post(
        "/finetune-jobs",
        422,
        json=finetune(e, evaluation={"suites": [qa_suite(name="general-qa")]}),
    ),
    "chat-template-in-a-subfolder-linking-out": lambda e: post(
        "/evaluations",
        403,
        json=evaluation(str(_nested_link_out(e, "additional_chat_templates", "x.jinja"))),
    ),
    "deeply-nested-file-linking-out": lambda e: post(
        "/evaluations", 403, json=evaluation(str(_nested_link_out(e, "a/b/c/d", "t.json")))
    ),
    "subfolder-linking-to-a-directory-out": lambda e: post(
        "/evaluations", 403, json=evaluation(str(_folder_link_out(e)))
    ),
    "adapter-subfolder-linking-out": lambda e: post(
        "/evaluations",
        403,
        json={
            "model": {
                "path": str(e.tiny),
                "adapter_path": str(_nested_link_out(e, "sub", "adapter_model.safetensors")),
            }
        },
    ),
    "config-with-more-layers-than-its-weights": lambda e: post(
        "/evaluations", 422, json=evaluation(str(_more_layers_than_weights(e)))
    ),
    "finetune-config-with-more-layers-than-its-weights": lambda e: post(
        "/finetune-jobs",
        422,
        json=finetune(e, base_model={"path": str(_more_layers_than_weights(e))}),
    ),
    "regex-unrolling-to-a-million": lambda e: post(
        "/suites", 422, json=_checklist({"type": "regex", "value": "(a{1000}){1000}"})
    ),
    "regex-huge-repetition-count": lambda e: post(
        "/suites", 422, json=_checklist({"type": "regex", "value": "x{100000000}"})
    ),
    "regex-nested-in-a-combinator": lambda e: post(
        "/suites",
        422,
        json=_checklist({"not": {"any": [{"type": "regex", "value": "((ab){200}){200}"}]}}),
    ),
    "regex-too-long": lambda e: post(
        "/suites", 422, json=_checklist({"type": "regex", "value": "a" * 1001})
    ),
    "inline-regex-unrolling-to-a-million": lambda e: post(
        "/evaluations",
        422,
        json={
            "model": {"path": str(e.tiny)},
            "suites": [_checklist({"type": "regex", "value": "(a{1000}){1000}"})],
        },
    ),
    # what the database cannot store
    "nul-in-label": lambda e: post(
        "/evaluations", 422, json=evaluation(str(e.tiny), label="a\x00")
    ),
    "nul-in-suite-prompt": lambda e: post(
        "/suites", 422, json=qa_suite(items=items(1, question="before\x00after"))
    ),
    "nul-in-check-value": lambda e: post(
        "/suites", 422, json=_checklist({"type": "contains", "value": "\x00"})
    ),
    "nul-in-a-free-form-key": lambda e: post(
        "/suites", 422, json=_checklist({"type": "contains", "value": "x", "\x00": 1})
    ),
    "nul-in-finetune-example": lambda e: post(
        "/finetune-jobs", 422, json=finetune(e, dataset={"examples": [{"text": "a\x00b"}]})
    ),
    "nul-in-evaluation-id": lambda e: get("/evaluations/ev_%00x", 422),
    "nul-in-cancel-id": lambda e: post("/evaluations/ev_%00x/cancel", 422),
    "nul-in-finetune-id": lambda e: get("/finetune-jobs/ft%00/events", 422),
    "nul-in-cursor": lambda e: get("/evaluations?cursor=abc%00", 422),
    "nul-in-suites-cursor": lambda e: get("/suites?cursor=a%00", 422),
    "nul-in-encoded-cursor": lambda e: get(
        "/evaluations?cursor=MjAyNi0wMS0wMVQwMDowMDowMHxldl8AeA", 422
    ),
    "nul-in-model-path-filter": lambda e: get("/evaluations?model_path=m%00", 422),
    "nul-in-item-filter": lambda e: get("/evaluations/ev_x/items?category=%00", 422),
    "nul-in-compare-id": lambda e: get("/compare?before=a%00&after=b", 422),
    "query-not-utf8": lambda e: get("/evaluations?model_path=%ff%fe", 422),
    "infinity-in-a-float": lambda e: raw("/finetune-jobs", 422, _raw_finetune(e, "Infinity")),
    "minus-infinity-in-a-float": lambda e: raw(
        "/finetune-jobs", 422, _raw_finetune(e, "-Infinity")
    ),
    "nan-in-a-float": lambda e: raw("/finetune-jobs", 422, _raw_finetune(e, "NaN")),
    "float-overflowing-to-infinity": lambda e: raw(
        "/finetune-jobs", 422, _raw_finetune(e, "1e999")
    ),
    "infinity-in-a-free-form-check": lambda e: raw(
        "/suites",
        422,
        json.dumps(_checklist({"type": "contains", "value": "x"})).replace(
            '"x"', '"x", "w": Infinity'
        ),
    ),
    "item-cursor-beyond-the-integer-column": lambda e: get(
        "/evaluations/ev_x/items?cursor=9223372036854775808", 422
    ),
    "item-cursor-of-40-digits": lambda e: get("/evaluations/ev_x/items?cursor=" + "9" * 40, 422),
    "event-cursor-beyond-the-integer-column": lambda e: get(
        "/finetune-jobs/ft_x/events?cursor=18446744073709551616", 422
    ),
    "boolean-as-an-integer": lambda e: post(
        "/evaluations", 422, json=evaluation(str(e.tiny), generation={"max_new_tokens": True})
    ),
    "integer-as-a-boolean": lambda e: post(
        "/evaluations", 422, json=evaluation(str(e.tiny), cache=1)
    ),
    "boolean-as-a-hyperparameter": lambda e: post(
        "/finetune-jobs", 422, json=finetune(e, hyperparameters={"seed": False})
    ),
    "lone-surrogate-in-a-check": lambda e: raw(
        "/suites",
        422,
        json.dumps(_checklist({"type": "contains", "value": "x"})).replace('"x"', '"\\ud800"'),
    ),
    "lone-surrogate-in-a-label": lambda e: raw(
        "/evaluations",
        422,
        json.dumps(evaluation(str(e.tiny), label="L")).replace('"L"', '"\\udfff"'),
    ),
    # bodies are UTF-8, so the nesting guard and the parser read the same text
    "utf-16-body": lambda e: raw("/evaluations", 400, _encoded(e, "utf-16")),
    "utf-16-le-body-without-bom": lambda e: raw("/evaluations", 400, _encoded(e, "utf-16-le")),
    "utf-32-body": lambda e: raw("/evaluations", 400, _encoded(e, "utf-32")),
    "utf-16-deep-nesting": lambda e: raw(
        "/suites", 400, _nested(JSON_MAX_DEPTH * 4).encode("utf-16-be")
    ),
}
CASES.update(ROUND_TWO)


def assert_nothing_created(client: TestClient, settings: Settings) -> None:
    """No evaluation, item, job or claim rows; only the built-in suites; the API still healthy."""
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}
    listed = client.get("/evaluations")
    assert listed.status_code == 200 and listed.json()["data"] == []
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            for table in (Evaluation, EvaluationItem, FinetuneJob, Claim):
                count = conn.execute(select(func.count()).select_from(table)).scalar_one()
                assert count == 0, f"{table.__tablename__} has {count} rows"
            sources = set(conn.execute(select(Suite.source)).scalars())
            assert sources == {"builtin"}
    finally:
        engine.dispose()


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_request_is_refused_and_leaves_no_trace(
    api: TestClient, settings: Settings, env: Env, case: str
) -> None:
    method, url, kwargs, expected = CASES[case](env)
    response = api.request(method, url, **kwargs)
    assert response.status_code == expected, response.text[:500]
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert PROBLEM_KEYS <= body.keys() and body["status"] == expected
    assert "Traceback" not in response.text
    if str(env.outside) not in repr(kwargs):
        assert str(env.outside) not in response.text  # where a link leads is never revealed
        assert str(env.outside.parent) not in response.text
    assert SECRET not in response.text  # nor what a linked file holds
    assert_nothing_created(api, settings)


def test_filters_are_parameters_not_sql(api: TestClient, settings: Settings) -> None:
    for value in ("' OR '1'='1", "x'; DROP TABLE evaluations;--", "%", "_"):
        response = api.get("/evaluations", params={"model_path": value})
        assert response.status_code == 200 and response.json()["data"] == []
    assert_nothing_created(api, settings)


def test_sql_looking_label_is_stored_verbatim(api: TestClient, env: Env) -> None:
    # Accepted (the request is otherwise valid) and stored as text: the database is untouched.
    label = "'); DROP TABLE evaluations;--"
    created = api.post("/evaluations", json=evaluation(str(env.tiny), label=label))
    assert created.status_code == 202, created.text
    assert api.get(f"/evaluations/{created.json()['id']}").json()["label"] == label
    assert len(api.get("/evaluations").json()["data"]) == 1


def test_a_body_at_the_limit_is_read_and_validated_not_refused(api: TestClient) -> None:
    padded = json.dumps(qa_suite()).encode()
    padded += b" " * (BODY_LIMIT - len(padded))
    response = api.post("/suites", content=padded, headers=JSON)
    assert response.status_code == 201, response.text


def test_the_largest_allowed_suite_is_accepted(api: TestClient) -> None:
    items = [{"id": f"q{i}", "question": "q", "answers": ["a"]} for i in range(10_000)]
    response = api.post("/suites", json=qa_suite(items=items))
    assert response.status_code == 201, response.text[:300]
    assert response.json()["item_count"] == 10_000


# --- the JSON nesting scanner ----------------------------------------------------------------


def _depth_exceeded(chunks: list[bytes], limit: int) -> bool:
    scanner = JsonNesting(limit)
    return any(scanner.feed(chunk) for chunk in chunks)


def test_nesting_counts_brackets_outside_strings_only() -> None:
    assert not _depth_exceeded([b'{"a": [[1]]}'], 3)
    assert _depth_exceeded([b'{"a": [[[1]]]}'], 3)
    assert not _depth_exceeded([b'{"a": "[[[[[[{{{{"}'], 1)
    assert not _depth_exceeded([b'{"a": "say \\"[[[[\\" ok", "b": 1}'], 1)
    assert not _depth_exceeded([b'{"a": "back\\\\", "b": [1]}'], 2)


def test_nesting_scan_survives_any_chunk_boundary() -> None:
    body = json.dumps({"a": 'q"[[\\', "b": [[{"c": "]]\\\\"}]], "d": "{"}).encode()
    depth = 4
    for cut in range(1, len(body)):
        assert not _depth_exceeded([body[:cut], body[cut:]], depth), cut
        assert _depth_exceeded([body[:cut], body[cut:]], depth - 1), cut


def _reference_depth(text: str) -> int:
    """The deepest nesting of a JSON text, one character at a time (slow, obviously right)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _random_json(rng: random.Random, depth: int) -> Any:
    tricky = ['"', "\\", "[", "]", "{", "}", "a", '\\"', "é", "\n"]
    if depth == 0 or rng.random() < 0.3:
        return "".join(rng.choice(tricky) for _ in range(rng.randint(0, 8)))
    children = [_random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    if rng.random() < 0.5:
        return children
    return {"".join(rng.choice(tricky) for _ in range(3)): child for child in children}


def test_nesting_scan_agrees_with_a_reference_on_random_json() -> None:
    rng = random.Random(8)
    for _ in range(300):
        body = json.dumps(_random_json(rng, rng.randint(0, 12)), ensure_ascii=False)
        expected = _reference_depth(body)
        raw = body.encode()
        cuts = sorted(rng.sample(range(1, len(raw)), k=min(len(raw) - 1, rng.randint(0, 6))))
        chunks = [raw[i:j] for i, j in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        assert _depth_exceeded(chunks, expected) is False, body
        if expected:
            assert _depth_exceeded(chunks, expected - 1) is True, body


def test_nesting_scan_handles_a_body_larger_than_one_slice() -> None:
    body = b'{"a": "' + b"[" * (3 * JsonNesting.SLICE) + b'", "b": ' + b"[" * 70 + b"]" * 70 + b"}"
    assert _depth_exceeded([body], 71) is False
    assert _depth_exceeded([body], 70) is True


def test_nested_checks_below_the_limit_are_fine(api: TestClient) -> None:
    response = api.post("/suites", content=_nested(JSON_MAX_DEPTH - 8), headers=JSON)
    assert response.status_code == 201, response.text[:300]
