"""Integer query parameters agree with the schema on both databases: the largest value an
``Integer`` column holds (PostgreSQL's 32-bit INTEGER) is a valid cursor or version, one more
is a 422, and nothing answers 500 (PostgreSQL would refuse to cast it: integer out of range)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from sqlalchemy import insert

from app.core.tables import SQL_INT_MAX, FinetuneEvent, FinetuneJob, utcnow
from tests.conftest import qa_suite
from tests.stored import qa_row, store_finished


def _evaluation_with_items(client: Any, tiny_model_dir: Any) -> str:
    suite = qa_suite("bounds", 3)
    created = client.post(
        "/evaluations", json={"model": {"path": str(tiny_model_dir)}, "suites": [suite]}
    )
    assert created.status_code == 202, created.text
    evaluation_id = created.json()["id"]
    rows = [
        qa_row(evaluation_id, "bounds", n, item, response="x", passed=False, category="even")
        for n, item in enumerate(suite["items"])
    ]
    store_finished(client, evaluation_id, rows, status="succeeded", results={})
    return str(evaluation_id)


def _job_with_events(client: Any) -> str:
    with client.app.state.sessionmaker() as session, session.begin():
        session.execute(
            insert(FinetuneJob),
            [
                {
                    "id": "ft_bounds",
                    "base_model_path": "m",
                    "request": {},
                    "status": "failed",
                    "created_at": utcnow(),
                }
            ],
        )
        session.execute(
            insert(FinetuneEvent),
            [{"job_id": "ft_bounds", "level": "info", "message": f"e{n}"} for n in range(3)],
        )
    return "ft_bounds"


def test_largest_valid_cursor_pages_and_the_next_is_refused(
    client: Any, tiny_model_dir: Any
) -> None:
    evaluation_id = _evaluation_with_items(client, tiny_model_dir)
    job_id = _job_with_events(client)
    for listing in (f"/evaluations/{evaluation_id}/items", f"/finetune-jobs/{job_id}/events"):
        first = client.get(listing)
        assert first.status_code == 200 and len(first.json()["data"]) == 3, first.text
        paged = client.get(listing, params={"limit": 1})
        assert paged.json()["has_more"] is True
        after = client.get(listing, params={"limit": 5, "cursor": paged.json()["next_cursor"]})
        assert len(after.json()["data"]) == 2
        last = client.get(listing, params={"cursor": str(SQL_INT_MAX)})
        assert last.status_code == 200, last.text
        assert last.json() == {"data": [], "next_cursor": None, "has_more": False}
        padded = client.get(listing, params={"cursor": "0" * 9 + str(SQL_INT_MAX)})
        assert padded.status_code == 200, padded.text
        for beyond in (SQL_INT_MAX + 1, 2**63 - 1, 2**63):
            refused = client.get(listing, params={"cursor": str(beyond)})
            assert refused.status_code == 422, (listing, beyond, refused.text)
            assert "cursor" in refused.json()["detail"]


def test_suite_versions_are_bounded_like_the_column(client: Any) -> None:
    assert client.get(f"/suites/general-qa?version={SQL_INT_MAX}").status_code == 404
    assert client.get(f"/suites/general-qa?version={SQL_INT_MAX + 1}").status_code == 422
    # A suite reference naming a version no column can hold is simply not found.
    created = client.post(
        "/evaluations",
        json={"model": {"path": "nowhere"}, "suites": [f"general-qa@{SQL_INT_MAX + 1}"]},
    )
    assert created.status_code in (403, 422), created.text


@pytest.mark.parametrize(
    "stamp",
    [
        "0001-01-01T00:00:00-23:59",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59.999999-23:59",
        "9999-12-31T23:59:59+00:00",
        "2026-01-01T00:00:00",
    ],
)
def test_listing_cursors_at_the_ends_of_time_never_fail(client: Any, stamp: str) -> None:
    cursor = base64.urlsafe_b64encode(f"{stamp}|ev_x".encode()).decode().rstrip("=")
    for listing in ("/evaluations", "/finetune-jobs"):
        response = client.get(listing, params={"cursor": cursor})
        assert response.status_code in (200, 422), (listing, stamp, response.text)
