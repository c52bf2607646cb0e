"""The /ui pages through TestClient: status codes, content, escaping, error pages, auth."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.core.tables import Evaluation, FinetuneJob
from app.main import create_app
from tests.ui.conftest import add_evaluation
from tests.ui.seed import Pair, seed_checklist_rose_pair, seed_finetune_job


def _html(response: Any) -> str:
    assert response.headers["content-type"].startswith("text/html"), response.headers
    return str(response.text)


def test_evaluations_list_shows_status_and_live_progress(
    client: TestClient, db: Callable[[], Session], collapsed: Pair
) -> None:
    with db() as session:
        running = add_evaluation(
            session,
            label="halfway",
            status="running",
            progress={"done": 12, "total": 330, "stage": "general-qa"},
        )
    html = _html(client.get("/ui"))
    assert "smollm2-135m base" in html and "drug-qa full fine-tune, lr 1e-3" in html
    assert f'href="/ui/evaluations/{running}"' in html
    assert '<progress max="330" value="12">' in html and "general-qa" in html
    assert 'data-refresh="' in html  # a running job makes the page refresh itself
    assert 'src="/ui/static/refresh.js"' in html
    assert "general-qa</span> 69%" in html  # headline score of the base run


def test_finished_list_does_not_refresh(client: TestClient, collapsed: Pair) -> None:
    html = _html(client.get("/ui"))
    assert "data-refresh" not in html


def test_status_filter_lists_only_that_status(
    client: TestClient, db: Callable[[], Session], collapsed: Pair
) -> None:
    with db() as session:
        add_evaluation(session, label="still-queued")
    html = _html(client.get("/ui?status=queued"))
    assert "still-queued" in html
    assert f'href="/ui/evaluations/{collapsed.before}"' not in html
    bad = client.get("/ui?status=exploded")
    assert bad.status_code == 422 and "status must be one of" in _html(bad)


def test_evaluation_page_shows_category_bars_checklist_and_items(
    client: TestClient, collapsed: Pair
) -> None:
    html = _html(client.get(f"/ui/evaluations/{collapsed.before}"))
    assert '<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img"' in html
    for category in ("geography", "history", "science", "math"):
        assert f'data-category="{category}"' in html
    assert '<span class="badge sev-critical">critical</span>' in html
    assert "Basic instruction following" in html
    assert "What is the capital of France?" in html
    assert "69.0%" in html  # general-qa overall accuracy card


def test_item_table_filters_by_result_and_category(client: TestClient, collapsed: Pair) -> None:
    html = _html(client.get(f"/ui/evaluations/{collapsed.after}?passed=false&category=geography"))
    table = html.split('<table class="data items">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr class=\"([^\"]*)\">", table)
    assert rows and all(r == "row-fail" for r in rows)
    assert "✓ pass" not in table
    assert table.count("<td>geography") == len(rows)
    passing = _html(client.get(f"/ui/evaluations/{collapsed.before}?passed=true&suite=general-qa"))
    table = passing.split('<table class="data items">', 1)[1].split("</table>", 1)[0]
    assert "✗ fail" not in table and "✓ pass" in table
    assert client.get(f"/ui/evaluations/{collapsed.after}?passed=maybe").status_code == 422


def test_compare_page_shows_verdict_statistics_flips_and_drift(
    client: TestClient, collapsed: Pair
) -> None:
    response = client.get(f"/ui/compare?before={collapsed.before}&after={collapsed.after}")
    assert response.status_code == 200
    html = _html(response)
    assert "✗ FAIL" in html and 'id="headline">FAIL: accuracy dropped 0.647' in html
    assert "▼ 65 points" in html
    assert "critical behaviour &#39;Basic instruction following&#39; fell from 8/8 to 0/8" in html
    assert "&lt; 0.0001" in html  # McNemar p
    assert re.search(r"\[0\.\d\d, 0\.\d\d\]", html)  # the CI of the drop
    assert "163 forgotten" in html
    # Forgotten items side by side: the question, the right answer before, the babble after.
    forgotten = html.split('id="forgotten"', 1)[1].split("</table>", 1)[0]
    row = forgotten.split("What is the capital of Japan?", 1)[1].split("</tr>", 1)[0]
    assert "Tokyo." in row and re.search(r"Japan (is an?|blocks)|Take Japan", row)
    assert "3.48 → " in html and "9.64" in html and "+177%" in html
    # Grouped before/after bars, worst category first.
    chart = html.split('id="categories"', 1)[1]
    assert "<title>Accuracy by category, before and after fine-tuning</title>" in chart
    labels = re.findall(r'data-category="([^"]+)"', chart.split("</svg>", 1)[0])
    assert labels[0] == "geography" and set(labels) >= {"history", "science", "math"}
    assert "▼ 78 pts" in chart


def test_compare_page_escapes_model_output(client: TestClient, collapsed: Pair) -> None:
    html = _html(client.get(f"/ui/compare?before={collapsed.before}&after={collapsed.after}"))
    assert "<script>window.__pwned" not in html
    assert "<img src=x" not in html
    assert "&lt;script&gt;window.__pwned = 1;" in html
    assert "&lt;img src=x onerror=" in html
    # The only script on the page is our own refresh script.
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/ui/static/refresh.js" defer>']
    csp = client.get(f"/ui/compare?before={collapsed.before}&after={collapsed.after}").headers
    assert "script-src 'self'" in csp["content-security-policy"]


def test_evaluation_page_escapes_model_output(client: TestClient, collapsed: Pair) -> None:
    html = _html(client.get(f"/ui/evaluations/{collapsed.after}?passed=false&category=geography"))
    assert "<script>window.__pwned" not in html and "&lt;script&gt;window.__pwned" in html


def test_compare_page_passes_a_healthy_fine_tune(client: TestClient, healthy: Pair) -> None:
    html = _html(client.get(f"/ui/compare?before={healthy.before}&after={healthy.after}"))
    assert "✓ PASS" in html and 'id="headline">PASS: no forgetting rule failed' in html
    assert "✗ FAIL" not in html


def test_compare_without_ids_offers_a_picker(client: TestClient, collapsed: Pair) -> None:
    html = _html(client.get("/ui/compare"))
    assert "Compare two evaluations" in html
    assert f'<option value="{collapsed.before}"' in html


def test_unknown_evaluation_is_an_html_404(client: TestClient) -> None:
    response = client.get("/ui/evaluations/ev_doesnotexist")
    assert response.status_code == 404
    html = _html(response)
    assert "Evaluation not found" in html
    assert "evaluation &#39;ev_doesnotexist&#39; does not exist" in html


def test_compare_with_unknown_id_is_an_html_404(client: TestClient, collapsed: Pair) -> None:
    response = client.get(f"/ui/compare?before={collapsed.before}&after=ev_gone")
    assert response.status_code == 404 and "ev_gone" in _html(response)


def test_incomparable_runs_are_an_html_409_that_says_what_differs(
    client: TestClient, db: Callable[[], Session], collapsed: Pair
) -> None:
    with db() as session:
        after = session.get(Evaluation, collapsed.after)
        assert after is not None
        after.generation = {"max_new_tokens": 20, "stop": []}
        session.commit()
    response = client.get(f"/ui/compare?before={collapsed.before}&after={collapsed.after}")
    assert response.status_code == 409
    html = _html(response)
    assert "Evaluations not comparable" in html and "generation settings differ" in html


def test_unfinished_run_is_an_html_409(
    client: TestClient, db: Callable[[], Session], collapsed: Pair
) -> None:
    with db() as session:
        running = add_evaluation(session, status="running")
    response = client.get(f"/ui/compare?before={collapsed.before}&after={running}")
    assert response.status_code == 409
    assert "only succeeded evaluations can be compared" in _html(response)


def test_bad_threshold_is_an_html_422(client: TestClient, collapsed: Pair) -> None:
    url = f"/ui/compare?before={collapsed.before}&after={collapsed.after}&threshold=2"
    response = client.get(url)
    assert response.status_code == 422
    assert "threshold must be less than or equal to 1; got &#39;2&#39;" in _html(response)


def test_the_dashboard_reads_every_rule_of_the_book(
    client: TestClient, healthy: Pair, collapsed: Pair
) -> None:
    pair = f"before={healthy.before}&after={healthy.after}"
    assert "✓ PASS" in _html(client.get(f"/ui/compare?{pair}"))
    # max_kl and alpha were once dropped here: both now reach the comparison, as in /compare.
    kl = _html(client.get(f"/ui/compare?{pair}&max_kl=0"))
    assert "max_kl is set but KL to base on &#39;general-text&#39; is unavailable" in kl
    assert "99% CI of the drop" in _html(client.get(f"/ui/compare?{pair}&alpha=0.01"))
    for bad, says in (
        ("alpha=0.7", "alpha must be less than 0.5"),
        ("category_rule=bogus", "category_rule must be &#39;point&#39; or &#39;significant&#39;"),
        ("max_kl=-1", "max_kl must be greater than or equal to 0"),
    ):
        response = client.get(f"/ui/compare?{pair}&{bad}")
        assert response.status_code == 422 and says in _html(response), bad
    # An empty form field keeps the rule book's default.
    assert "✓ PASS" in _html(client.get(f"/ui/compare?{pair}&threshold=&max_kl="))
    # The links to the same comparison keep every rule that was set.
    html = _html(
        client.get(
            f"/ui/compare?before={collapsed.before}&after={collapsed.after}"
            "&threshold=0.2&alpha=0.01"
        )
    )
    query = (
        f"before={collapsed.before}&amp;after={collapsed.after}&amp;threshold=0.2&amp;alpha=0.01"
    )
    assert f'href="?{query}&amp;flips=all#forgotten"' in html
    assert f'href="/compare?{query}"' in html


def test_the_checklist_card_is_coloured_by_the_direction_of_the_score(
    client: TestClient, db: Callable[[], Session]
) -> None:
    with db() as session:
        rose = seed_checklist_rose_pair(session)
    html = _html(client.get(f"/ui/compare?before={rose.before}&after={rose.after}"))
    card = html.split("Behavioural checklist", 1)[1].split("</div>\n  </div>", 1)[0]
    assert '94% → <span class="good-text">98%</span>' in card, card
    assert "▲ 4 points" in card and "1 newly failing" in card
    reverse = _html(client.get(f"/ui/compare?before={rose.after}&after={rose.before}"))
    card = reverse.split("Behavioural checklist", 1)[1].split("</div>\n  </div>", 1)[0]
    assert '98% → <span class="bad-text">94%</span>' in card, card
    assert "▼ 4 points" in card


def test_unknown_dashboard_path_is_an_html_404(client: TestClient) -> None:
    response = client.get("/ui/nothing/here")
    assert response.status_code == 404 and "/ui/nothing/here" in _html(response)


def test_finetune_job_page_draws_curves_and_links_the_compare(
    client: TestClient, collapsed: Pair
) -> None:
    assert collapsed.job is not None
    html = _html(client.get(f"/ui/finetune-jobs/{collapsed.job}"))
    assert html.count("<polyline") == 2  # loss and learning rate
    assert "<title>Loss over training steps</title>" in html
    assert "learning_rate 0.001 is outside the rule of thumb" in html
    assert f'href="/ui/compare?before={collapsed.before}&amp;after={collapsed.after}' in html
    assert "✗ FAIL" in html  # the stored comparison's verdict
    assert "step 60/60" in html


def test_running_finetune_job_refreshes_and_unknown_job_is_404(
    client: TestClient, db: Callable[[], Session], collapsed: Pair
) -> None:
    with db() as session:
        job_id = seed_finetune_job(session, collapsed.before, None, status="running")
        session.commit()
        job = session.get(FinetuneJob, job_id)
        assert job is not None and job.status == "running"
    html = _html(client.get(f"/ui/finetune-jobs/{job_id}"))
    assert 'data-refresh="' in html and "30/60" in html and "Compare before" not in html
    missing = client.get("/ui/finetune-jobs/ft_missing")
    assert missing.status_code == 404
    assert "fine-tune job &#39;ft_missing&#39; does not exist" in _html(missing)


def test_static_files_are_served(client: TestClient) -> None:
    assert "font-family" in client.get("/ui/static/style.css").text
    assert "DOMParser" in client.get("/ui/static/refresh.js").text


def test_pages_need_a_read_key_when_keys_are_configured(settings: Any, collapsed: Pair) -> None:
    keyed = settings.model_copy(update={"api_keys": ["reader-key:read", "writer-key:write"]})
    with TestClient(create_app(keyed)) as client:
        page = f"/ui/compare?before={collapsed.before}&after={collapsed.after}"
        refused = client.get(page, headers={"Accept": "text/html"})
        assert refused.status_code == 401
        assert "Basic" in refused.headers["www-authenticate"]  # the browser asks for the key
        assert client.get("/ui/static/style.css").status_code == 401
        assert client.get(page, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get(page, headers={"Authorization": "Bearer reader-key"}).status_code == 200
        basic = base64.b64encode(b"anyone:reader-key").decode()
        response = client.get(page, headers={"Authorization": f"Basic {basic}"})
        assert response.status_code == 200 and "✗ FAIL" in response.text


def test_finetune_job_page_draws_the_forgetting_curve_beside_the_learning_curve(
    client: TestClient, db: Callable[[], Session], collapsed: Pair
) -> None:
    from app.core.tables import FinetuneCheckpoint

    with db() as session:
        job_id = seed_finetune_job(session, collapsed.before, collapsed.after)
        job = session.get(FinetuneJob, job_id)
        assert job is not None
        job.metrics = {"shipped": {"step": 20, "reason": "the final step 60 fails the guard"}}
        for step, accuracy, nll in ((0, 0.8, 3.1), (20, 0.75, 2.2), (40, 0.4, 1.5), (60, 0.1, 1.2)):
            session.add(
                FinetuneCheckpoint(
                    job_id=job_id,
                    step=step,
                    general={"accuracy": accuracy, "checklist_score": accuracy},
                    domain={"after": {"nll_per_token": nll, "accuracy": None}},
                    verdict={"verdict": "pass" if accuracy > 0.7 else "fail"},
                )
            )
        session.commit()
    html = _html(client.get(f"/ui/finetune-jobs/{job_id}"))
    assert 'id="forgetting"' in html and 'id="learning"' in html
    assert "<title>General abilities over training steps</title>" in html
    assert "<title>Domain learning over training steps</title>" in html
    # loss, learning rate, general accuracy, checklist, held-out NLL: one polyline each
    assert html.count("<polyline") == 5
    assert "held-out NLL/token: 4 points, first 3.1, last 1.2" in html
    assert "Shipped step 20" in html and "the final step 60 fails the guard" in html
    with db() as session:
        other = seed_finetune_job(session, collapsed.before, collapsed.after)
        session.commit()
    assert 'id="forgetting"' not in _html(client.get(f"/ui/finetune-jobs/{other}"))


def test_finetune_jobs_list_page_and_breadcrumb(client: TestClient, collapsed: Pair) -> None:
    assert collapsed.job is not None
    html = _html(client.get("/ui/finetune-jobs"))
    assert f'href="/ui/finetune-jobs/{collapsed.job}"' in html and "drug-qa full lr 1e-3" in html
    assert 'href="/ui/finetune-jobs?status=failed"' in html
    assert "drug-qa full lr 1e-3" not in _html(client.get("/ui/finetune-jobs?status=failed"))
    job_page = _html(client.get(f"/ui/finetune-jobs/{collapsed.job}"))
    assert '<a href="/ui/finetune-jobs">Fine-tune jobs</a>' in job_page
    assert 'href="/ui/finetune-jobs"' in _html(client.get("/ui"))


def test_hyperparameters_table_shows_resolved_values(client: TestClient, collapsed: Pair) -> None:
    html = _html(client.get(f"/ui/finetune-jobs/{collapsed.job}"))
    # Not overridden by the request: the risky preset's value, not None.
    assert re.search(r'gradient_accumulation_steps</th><td class="mono">1<', html), html
    assert '<td class="mono">None</td>' not in html
    assert "no limit (epochs decide)" in html  # max_steps unset: said in words


def test_cached_copies_are_hidden_from_the_list_until_asked_for(
    client: TestClient, db: Callable[[], Session], collapsed: Pair
) -> None:
    with db() as session:
        copy = add_evaluation(
            session,
            label="gate re-run",
            status="succeeded",
            cached_from=collapsed.before,
            progress={"done": 1, "total": 1, "stage": "done (cached)"},
        )
    html = _html(client.get("/ui"))
    assert f'href="/ui/evaluations/{copy}"' not in html
    assert "1 cached copy of earlier runs hidden" in html
    shown = _html(client.get("/ui?cached=show"))
    assert f'href="/ui/evaluations/{copy}"' in shown
    assert f'cached copy of <a class="mono" href="/ui/evaluations/{collapsed.before}"' in shown


def test_dashboard_links_the_offline_api_docs(client: TestClient) -> None:
    html = _html(client.get("/ui"))
    assert 'href="/docs"' in html
    docs = _html(client.get("/docs"))
    assert "cdn" not in docs.lower() and "/docs-assets/swagger-ui-bundle.js" in docs
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
