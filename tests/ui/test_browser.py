"""The dashboard in headless Chromium: a real server, a real browser, a real before/after pair.

Needs Debian's Chromium and Playwright's Python package (no browser download):
``apt-get install -y chromium`` and ``pip install -e '.[dev]'``. Skipped with the reason when
either is missing, except in CI (``CI`` set), where a missing browser is a failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.core.config import Settings
from app.core.database import make_engine, session_factory, upgrade
from app.core.tables import Evaluation
from app.main import create_app
from app.ui import routes
from tests.conftest import IN_CI
from tests.ui.conftest import add_evaluation
from tests.ui.live import chromium, missing_browser_reason, serve
from tests.ui.seed import Pair, seed_collapsed_pair

_REASON = missing_browser_reason()


@pytest.fixture(scope="module", autouse=True)
def _browser_available() -> None:
    if _REASON is None:
        return
    if IN_CI:
        pytest.fail(f"CI must run the browser tests: {_REASON}")
    pytest.skip(_REASON)


@dataclass
class Live:
    """A served app on a seeded SQLite database, and a headless Chromium."""

    base: str
    pair: Pair
    running: str
    browser: Any
    sessionmaker: Any


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One server and one browser for the module: starting Chromium is the slow part."""
    tmp = tmp_path_factory.mktemp("ui-browser")
    url = f"sqlite:///{tmp / 'forgetguard.db'}"
    upgrade(url)
    engine = make_engine(url)
    maker = session_factory(engine)
    with maker() as session:
        pair = seed_collapsed_pair(session, script_response=True)
        running = add_evaluation(
            session,
            label="in progress",
            status="running",
            progress={"done": 40, "total": 330, "stage": "general-qa"},
        )
    settings = Settings(
        database_url=url,
        model_roots=[Path(tmp) / "models"],
        data_roots=[Path(tmp) / "data"],
        artifacts_dir=Path(tmp) / "artifacts",
        cache_dir=Path(tmp) / "cache",
    )
    with serve(create_app(settings)) as base, chromium() as browser:
        yield Live(base=base, pair=pair, running=running, browser=browser, sessionmaker=maker)
    engine.dispose()


@pytest.fixture
def page(live: Live) -> Iterator[Any]:
    """A fresh page that records dialogs and console errors."""
    context = live.browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.dialogs = []  # type: ignore[attr-defined]
    page.errors = []  # type: ignore[attr-defined]
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    context.close()


def _compare_url(live: Live) -> str:
    return f"{live.base}/ui/compare?before={live.pair.before}&after={live.pair.after}"


def test_compare_page_loads_with_verdict_and_chart(live: Live, page: Any) -> None:
    response = page.goto(_compare_url(live))
    assert response is not None and response.status == 200
    verdict = page.locator("#verdict")
    assert verdict.is_visible()
    assert "FAIL: accuracy dropped" in verdict.inner_text()  # the headline states the reason
    chart = page.locator("#categories svg.chart")
    assert chart.is_visible()
    box = chart.bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 200
    assert chart.locator("rect").count() >= 14  # before and after bars for 7 categories
    assert "geography" in chart.text_content()
    assert chart.get_attribute("role") == "img"
    forgotten = page.locator("#forgotten table")
    assert forgotten.is_visible() and forgotten.locator("tbody tr").count() == 50
    assert page.errors == []  # the CSP blocks nothing the page itself needs


def test_script_in_a_model_response_does_not_run(live: Live, page: Any) -> None:
    page.goto(_compare_url(live))
    page.wait_for_load_state("load")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.title().startswith("Compare ") and "pwned" not in page.title()
    assert page.dialogs == []
    # The payload is on the page as text, exactly as the model wrote it.
    assert page.get_by_text("<script>window.__pwned = 1;", exact=False).count() >= 1
    assert page.locator("img[src='x']").count() == 0
    assert page.locator("script").count() == 1  # our refresh.js, nothing else


def test_script_in_a_response_does_not_run_on_the_evaluation_page(live: Live, page: Any) -> None:
    page.goto(f"{live.base}/ui/evaluations/{live.pair.after}?passed=false&category=geography")
    page.wait_for_load_state("load")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.get_by_text("<script>window.__pwned = 1;", exact=False).count() >= 1
    assert page.dialogs == []


def test_unknown_evaluation_shows_a_friendly_404(live: Live, page: Any) -> None:
    response = page.goto(f"{live.base}/ui/compare?before={live.pair.before}&after=ev_nope")
    assert response is not None and response.status == 404
    assert "Evaluation not found" in page.locator("h1").inner_text()
    assert "evaluation 'ev_nope' does not exist" in page.locator(".detail").inner_text()


def test_running_evaluation_progress_updates_without_a_reload(live: Live, page: Any) -> None:
    original = routes.ENV.globals["REFRESH_SECONDS"]
    routes.ENV.globals["REFRESH_SECONDS"] = 0.2
    try:
        page.goto(f"{live.base}/ui")
        page.evaluate("window.__sameDocument = true")
        assert "40/330" in page.locator("main").inner_text()
        with live.sessionmaker() as session:
            row = session.get(Evaluation, live.running)
            assert row is not None
            row.progress = {"done": 200, "total": 330, "stage": "forgetting-checklist"}
            session.commit()
        # A locator wait, not wait_for_function: the page's CSP forbids eval, rightly.
        page.locator("main").get_by_text("200/330").wait_for(timeout=5000)
        assert page.evaluate("window.__sameDocument") is True  # swapped in place, no reload
    finally:
        routes.ENV.globals["REFRESH_SECONDS"] = original


def test_api_docs_render_with_the_network_cut_off(live: Live) -> None:
    """/docs draws Swagger UI from the app's own files: every other host is unreachable."""
    context = live.browser.new_context()
    outside: list[str] = []

    def only_the_app(route: Any) -> None:
        if route.request.url.startswith(live.base):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort("internetdisconnected")

    context.route("**/*", only_the_app)
    page = context.new_page()
    try:
        page.goto(f"{live.base}/docs")
        page.wait_for_selector(".swagger-ui .information-container .title", timeout=20_000)
        assert "forgetguard" in page.inner_text(".swagger-ui .information-container .title")
        page.wait_for_selector(".opblock-summary-path", timeout=20_000)
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert any("/evaluations" in p for p in paths) and any("/finetune-jobs" in p for p in paths)
        assert outside == []
    finally:
        context.close()
