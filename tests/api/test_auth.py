"""API keys: 401 without a valid key, 403 for the wrong scope, /healthz open,
keys validated at startup, constant-time matching, and `serve` refusing an open bind."""

from __future__ import annotations

import base64
import hmac
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import create_engine, func, select
from typer.testing import CliRunner

from app.core.config import Settings, get_settings
from app.core.tables import Evaluation
from app.main import create_app
from app.web import auth

WRITE_KEY = "fgw-3q2ZkQb1Xy8tW0pLmN4r"
READ_KEY = "fgr-Jd8sLq0Zp3Vb6nYt1KcE"
PROBLEM_KEYS = {"type", "title", "status", "detail"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(settings: Settings) -> Iterator[TestClient]:
    """A client on an app with one write key and one read key configured."""
    keyed_settings = settings.model_copy(
        update={"api_keys": [f"{WRITE_KEY}:write", f"{READ_KEY}:read"]}
    )
    with TestClient(create_app(keyed_settings)) as client:
        yield client


def evaluation_body(model_dir: Path) -> dict[str, Any]:
    return {"model": {"path": str(model_dir)}, "suites": ["forgetting-checklist"]}


def count_evaluations(settings: Settings) -> int:
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(Evaluation)).scalar_one())
    finally:
        engine.dispose()


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert PROBLEM_KEYS <= body.keys() and body["status"] == status
    return body


# --- the HTTP contract ---------------------------------------------------------------------


def test_no_key_is_401_with_bearer_challenge(keyed: TestClient) -> None:
    response = keyed.get("/evaluations")
    body = assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in body["detail"]


def test_wrong_key_is_401_invalid_token(keyed: TestClient) -> None:
    response = keyed.get("/evaluations", headers=bearer(WRITE_KEY + "x"))
    assert_problem(response, 401)
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_read_key_posting_is_403_and_creates_nothing(
    keyed: TestClient, settings: Settings, tiny_model_dir: Path
) -> None:
    response = keyed.post(
        "/evaluations", json=evaluation_body(tiny_model_dir), headers=bearer(READ_KEY)
    )
    body = assert_problem(response, 403)
    assert "write key" in body["detail"]
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]
    assert count_evaluations(settings) == 0


def test_write_key_posts_202_and_read_key_reads_it(keyed: TestClient, tiny_model_dir: Path) -> None:
    created = keyed.post(
        "/evaluations", json=evaluation_body(tiny_model_dir), headers=bearer(WRITE_KEY)
    )
    assert created.status_code == 202, created.text
    location = created.headers["location"]
    assert keyed.get(location, headers=bearer(READ_KEY)).status_code == 200
    listed = keyed.get("/evaluations", headers=bearer(READ_KEY)).json()
    assert [e["id"] for e in listed["data"]] == [created.json()["id"]]
    # Cancelling is a write: a read key may not, a write key may.
    assert keyed.post(f"{location}/cancel", headers=bearer(READ_KEY)).status_code == 403
    cancelled = keyed.post(f"{location}/cancel", headers=bearer(WRITE_KEY))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_no_key_post_is_401_before_the_body_is_looked_at(keyed: TestClient) -> None:
    # Even a body over the size limit gets 401, not 413: nothing is read for a stranger.
    response = keyed.post(
        "/evaluations",
        content=b"x" * 100,
        headers={"content-type": "application/json", "content-length": str(10**12)},
    )
    assert_problem(response, 401)


def test_healthz_needs_no_key(keyed: TestClient) -> None:
    assert keyed.get("/healthz").json() == {"status": "ok", "database": "ok"}


def test_docs_and_schema_need_a_read_key(keyed: TestClient) -> None:
    # /docs-assets: Swagger UI's own files, served by the app (ReDoc is off: no offline copy).
    for path in ("/openapi.json", "/docs", "/docs-assets/swagger-ui-bundle.js"):
        assert keyed.get(path).status_code == 401, path
        assert keyed.get(path, headers=bearer(READ_KEY)).status_code == 200, path
    schema = keyed.get("/openapi.json", headers=bearer(READ_KEY)).json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert schema["paths"]["/evaluations"]["post"]["responses"]["401"]
    assert schema["paths"]["/healthz"]["get"]["security"] == []


def test_every_route_but_healthz_needs_a_key(keyed: TestClient) -> None:
    """Walks the app's own route table, so routes added by anyone, anywhere, are included."""
    checked = 0
    for route in keyed.app.routes:  # type: ignore[attr-defined]
        path = re.sub(r"\{[^}]+\}", "x", getattr(route, "path", ""))
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            response = keyed.request(method, path)
            if path == "/healthz":
                assert response.status_code == 200
            else:
                assert response.status_code == 401, (method, path, response.status_code)
                checked += 1
    assert checked >= 14


def test_routes_added_after_startup_are_covered(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"api_keys": [f"{READ_KEY}:read"]}))
    late = APIRouter(prefix="/late")

    @late.get("/thing")
    def thing() -> dict[str, str]:
        return {"ok": "yes"}

    app.include_router(late)
    with TestClient(app) as client:
        assert client.get("/late/thing").status_code == 401
        assert client.get("/late/thing", headers=bearer(READ_KEY)).json() == {"ok": "yes"}


def test_unknown_paths_are_401_without_a_key_and_404_with_one(keyed: TestClient) -> None:
    # Without a key the API does not even say which routes exist.
    assert_problem(keyed.get("/no/such/route"), 401)
    assert_problem(keyed.get("/no/such/route", headers=bearer(READ_KEY)), 404)


def test_ui_pages_need_a_read_key_and_offer_basic_to_browsers(keyed: TestClient) -> None:
    page = {"Accept": "text/html,application/xhtml+xml"}
    refused = keyed.get("/ui", headers=page)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert 'Basic realm="forgetguard"' in refused.headers["www-authenticate"]
    # A browser answers the Basic challenge; the key is the password, the user name is ignored.
    basic = base64.b64encode(f"anyone:{READ_KEY}".encode()).decode()
    shown = keyed.get("/ui", headers={**page, "Authorization": f"Basic {basic}"})
    assert shown.status_code == 200
    assert keyed.get("/ui/static/does-not-exist.css").status_code == 401


def test_scheme_name_is_case_insensitive_and_garbage_is_401(keyed: TestClient) -> None:
    assert keyed.get("/suites", headers={"Authorization": f"bearer {READ_KEY}"}).status_code == 200
    for header in (
        "Bearer",
        "Bearer ",
        f"Token {READ_KEY}",
        "Basic !!!notbase64",
        f"Basic {base64.b64encode(READ_KEY.encode()).decode()}",
    ):
        assert keyed.get("/suites", headers={"Authorization": header}).status_code == 401, header


def test_without_keys_the_api_is_open(client: TestClient) -> None:
    assert client.get("/evaluations").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})


# --- parsing and matching ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["secretkey"], "is not KEY:SCOPE"),
        (["secretkey:admin"], "scope must be 'read' or 'write'"),
        ([":read"], "is not KEY:SCOPE"),
        (["secret key:read"], "visible ASCII"),
        (["secretkey:read", "secretkey:write"], "another scope"),
    ],
)
def test_bad_key_entries_are_refused_without_echoing_the_key(
    entries: list[str], message: str
) -> None:
    with pytest.raises(auth.InvalidApiKeys, match=message) as caught:
        auth.parse_api_keys(entries)
    assert "secret" not in str(caught.value)


def test_a_key_without_scope_is_a_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGETGUARD_API_KEYS", "goodkey123:write,topsecret")
    with pytest.raises(ValidationError) as caught:
        get_settings()
    text = str(caught.value)
    assert "FORGETGUARD_API_KEYS entry 2 is not KEY:SCOPE" in text
    assert "topsecret" not in text and "goodkey123" not in text


def test_keys_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGETGUARD_API_KEYS", f" {WRITE_KEY}:write , {READ_KEY}:read ")
    keys = auth.parse_api_keys(get_settings().api_keys)
    assert [k.scope for k in keys] == ["write", "read"]
    assert WRITE_KEY not in repr(keys)  # digests only; a key never reaches a log line


def test_match_key_compares_against_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = auth.parse_api_keys([f"{WRITE_KEY}:write", f"{READ_KEY}:read", "third-key-xyz:read"])
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    found = auth.match_key(keys, WRITE_KEY.encode())
    assert found is not None and found.scope == "write"
    # The first key matched, yet all three were compared, each over equal-length digests.
    assert len(calls) == 3 and {len(a) for a, _ in calls} == {32}
    assert auth.match_key(keys, b"nope") is None


def test_read_scope_allows_only_get_and_head() -> None:
    read, write = auth.parse_api_keys(["r-key-1:read", "w-key-1:write"])
    assert read.allows("GET") and read.allows("HEAD")
    assert not any(read.allows(m) for m in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
    assert all(write.allows(m) for m in ("GET", "POST", "DELETE"))


def test_websocket_without_key_is_closed(keyed: TestClient) -> None:
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect) as caught, keyed.websocket_connect("/ws"):
        pass
    assert caught.value.code == 1008


# --- `forgetguard serve` and the bind address ------------------------------------------------


@pytest.fixture
def serve_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, Any]]:
    """Run `serve` without serving: record what uvicorn would have been asked to do."""
    import uvicorn

    import app.cli as cli
    import app.core.database

    calls: list[dict[str, Any]] = []

    class FakeServer:
        def __init__(self, config: Any) -> None:
            self.config = config

        def run(self) -> None:
            calls.append({"host": self.config.host})

    monkeypatch.setattr(uvicorn, "run", lambda _app, **kw: calls.append(kw))
    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    monkeypatch.setattr(cli.signal, "signal", lambda *_args: None)  # keep pytest's handlers
    monkeypatch.setattr(app.core.database, "upgrade", lambda *a, **k: None)

    class NoWorkers:
        def __init__(self, *args: Any) -> None: ...
        def start(self) -> None: ...
        def stop(self) -> None: ...

    monkeypatch.setattr(cli, "_Supervisor", NoWorkers)
    monkeypatch.setenv("FORGETGUARD_DATABASE_URL", f"sqlite:///{tmp_path / 'serve.db'}")
    monkeypatch.delenv("FORGETGUARD_API_KEYS", raising=False)
    return calls


def _serve(*args: str) -> Any:
    from app.cli import app as cli_app

    return CliRunner().invoke(cli_app, ["serve", "--workers", "0", *args])


def test_serve_refuses_a_public_bind_without_keys(serve_calls: list[dict[str, Any]]) -> None:
    result = _serve("--host", "0.0.0.0")
    assert result.exit_code == 2
    assert "refusing to bind 0.0.0.0 without API keys" in result.output
    assert serve_calls == []


def test_serve_binds_loopback_without_keys(serve_calls: list[dict[str, Any]]) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        assert _serve("--host", host).exit_code == 0, host
    assert [c["host"] for c in serve_calls] == ["127.0.0.1", "::1", "localhost"]


def test_serve_binds_publicly_with_insecure_or_with_keys(
    serve_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _serve("--host", "0.0.0.0", "--insecure").exit_code == 0
    monkeypatch.setenv("FORGETGUARD_API_KEYS", f"{WRITE_KEY}:write")
    assert _serve("--host", "0.0.0.0").exit_code == 0
    assert [c["host"] for c in serve_calls] == ["0.0.0.0", "0.0.0.0"]


def test_serve_with_a_malformed_key_does_not_start(
    serve_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGETGUARD_API_KEYS", "onlyakey")
    result = _serve("--host", "127.0.0.1")
    assert result.exit_code != 0
    assert "FORGETGUARD_API_KEYS entry 1" in str(result.exception)
    assert serve_calls == []
