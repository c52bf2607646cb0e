"""Every timestamp in every JSON response is one format: ISO 8601 UTC with milliseconds and a
single ``Z``, which both ``datetime.fromisoformat`` and JavaScript's ``Date`` parse."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import update

from app.core.tables import Evaluation

# The ECMAScript date-time string format (what Date.parse must accept), in UTC.
JS_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
QA = {
    "name": "stamp-qa",
    "kind": "qa",
    "items": [
        {"id": "q1", "question": "Capital of France?", "answers": ["Paris"], "category": "geo"}
    ],
}


def _timestamps(body: Any, path: str = "") -> list[tuple[str, str]]:
    """Every ``*_at`` string value in a JSON document, with its path."""
    found: list[tuple[str, str]] = []
    if isinstance(body, dict):
        for key, value in body.items():
            if key.endswith("_at") and isinstance(value, str):
                found.append((f"{path}.{key}", value))
            else:
                found += _timestamps(value, f"{path}.{key}")
    elif isinstance(body, list):
        for index, value in enumerate(body):
            found += _timestamps(value, f"{path}[{index}]")
    return found


def test_every_timestamp_parses_in_python_and_javascript(client: Any, tiny_model_dir: Path) -> None:
    model = {"path": str(tiny_model_dir)}
    responses = [
        client.post("/suites", json=QA),
        client.get("/suites"),
        client.get("/suites/general-qa"),
        client.get("/suites/stamp-qa?version=1"),
    ]
    evaluation = client.post("/evaluations", json={"model": model, "suites": ["stamp-qa"]})
    responses.append(evaluation)
    ev = evaluation.json()["id"]
    with client.app.state.sessionmaker() as session, session.begin():
        session.execute(
            update(Evaluation)
            .where(Evaluation.id == ev)
            .values(status="running", started_at=Evaluation.created_at)
        )
    responses += [client.get(f"/evaluations/{ev}"), client.get("/evaluations")]
    responses.append(client.post(f"/evaluations/{ev}/cancel"))
    job = client.post(
        "/finetune-jobs",
        json={
            "base_model": model,
            "dataset": {"examples": [{"text": "Q: What is aspirin?\nA: An NSAID."}]},
            "evaluation": {"suites": ["stamp-qa"]},
        },
    )
    responses.append(job)
    ft = job.json()["id"]
    responses += [
        client.get(f"/finetune-jobs/{ft}"),
        client.get("/finetune-jobs"),
        client.post(f"/finetune-jobs/{ft}/cancel"),
        client.get(f"/finetune-jobs/{ft}/events"),
        client.get("/workers"),
    ]
    seen = 0
    for response in responses:
        assert response.status_code < 300, response.text
        for where, value in _timestamps(response.json()):
            seen += 1
            assert JS_DATE.match(value), f"{response.url} {where} = {value!r}"
            parsed = datetime.fromisoformat(value)
            assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0
    assert seen >= 15


def test_cancelled_and_failed_jobs_do_not_stay_at_stage_queued(
    client: Any, tiny_model_dir: Path
) -> None:
    model = {"path": str(tiny_model_dir)}
    ev = client.post("/evaluations", json={"model": model, "suites": [QA]}).json()
    assert ev["progress"]["stage"] == "queued"
    cancelled = client.post(f"/evaluations/{ev['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["progress"]["stage"] == "cancelled"
    assert client.get(f"/evaluations/{ev['id']}").json()["progress"]["stage"] == "cancelled"
    job = client.post(
        "/finetune-jobs",
        json={
            "base_model": model,
            "dataset": {"examples": [{"text": "Q: What is aspirin?\nA: An NSAID."}]},
            "evaluation": {"suites": [QA]},
        },
    ).json()
    stopped = client.post(f"/finetune-jobs/{job['id']}/cancel").json()
    assert stopped["progress"]["stage"] == "cancelled"
