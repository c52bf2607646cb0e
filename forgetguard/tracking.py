"""Log a comparison to MLflow: the gate's ``--mlflow URI``, or your own code after ``compare``.

Needs the ``mlflow`` extra (``pip install 'forgetguard[mlflow]'``, the light ``mlflow-skinny``).
Metrics: accuracy before/after and drop, per-category before/after/drop and p-values, the
McNemar p-value and CI of the drop, checklist scores, NLL and KL drift, domain gain; the
Markdown report and the full comparison JSON are artifacts, the verdict a tag.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

REPORT = "forgetguard-report.md"
COMPARISON = "comparison.json"


def _name(*parts: str) -> str:
    # MLflow keys allow letters, digits, '_', '-', '.', ' ' and '/'.
    return ".".join(re.sub(r"[^A-Za-z0-9_\-. /]", "_", p) for p in parts)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def comparison_metrics(comparison: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a ``/compare`` body as flat MLflow metric names (pure)."""
    metrics: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if (number := _number(value)) is not None:
            metrics[name] = number

    for key in ("overall_accuracy_before", "overall_accuracy_after", "accuracy_drop"):
        put(key, comparison.get(key))
    put("verdict_pass", comparison.get("verdict") == "pass")
    for category, entry in (comparison.get("category_drops") or {}).items():
        if isinstance(entry, Mapping):
            for key, value in entry.items():
                put(_name("category", str(category), str(key)), value)
        else:
            put(_name("category", str(category), "drop"), entry)
    stats = comparison.get("statistics") or {}
    for key in ("mcnemar_p_value", "n_pairs", "forgotten", "learned", "min_detectable_drop"):
        put(_name("statistics", key), stats.get(key))
    ci = stats.get("drop_ci95") or [None, None]
    put("statistics.drop_ci95_low", ci[0])
    put("statistics.drop_ci95_high", ci[1])
    checklist = comparison.get("checklist") or {}
    for key in ("score_before", "score_after"):
        put(_name("checklist", key), checklist.get(key))
    put("checklist.newly_failing", len(checklist.get("newly_failing") or []))
    for path, value in _leaves(comparison.get("drift") or {}, ("drift",)):
        put(_name(*path), value)
    for path, value in _leaves(comparison.get("domain") or {}, ("domain",)):
        put(_name(*path), value)
    return metrics


def _leaves(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _leaves(value, (*path, str(key)))
    elif _number(node) is not None:
        yield path, node


def log_comparison(
    uri: str,
    comparison: Mapping[str, Any],
    markdown: str,
    *,
    experiment: str = "forgetguard",
    run_name: str | None = None,
) -> str:
    """Create an MLflow run at tracking ``uri`` holding the comparison; returns the run id."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise RuntimeError(
            "logging to MLflow needs the mlflow extra: pip install 'forgetguard[mlflow]'"
        ) from None
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    name = run_name or f"gate {comparison.get('before')} → {comparison.get('after')}"
    run = client.create_run(experiment_id, run_name=name)
    run_id = run.info.run_id
    try:
        for key in ("before", "after", "threshold", "mode"):
            if comparison.get(key) is not None:
                client.log_param(run_id, key, str(comparison[key]))
        client.set_tag(run_id, "forgetguard.verdict", str(comparison.get("verdict")))
        for key, value in comparison_metrics(comparison).items():
            client.log_metric(run_id, key, value)
        client.log_text(run_id, markdown, REPORT)
        client.log_dict(run_id, dict(comparison), COMPARISON)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return str(run_id)
