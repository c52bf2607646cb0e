"""What ``forgetguard gate`` was asked to do, and the requests it derives from that (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgetguard.client import DEFAULT_URL
from forgetguard.rules import CompareRules
from forgetguard.suites import InvalidReference, split_list
from forgetguard.suites import suite_names as reference_names

# The noise-floor rerun decodes the base at this batch size (another composition than the
# engine's default), or at the second one when the base already ran at the first.
NOISE_FLOOR_BATCH_SIZES = (3, 5)


class GateError(Exception):
    """Something other than the model's quality stopped the gate (exit 2)."""


@dataclass
class GateOptions:
    """Everything ``forgetguard gate`` was asked to do; the verdict's rules are ``rules``."""

    server: str = DEFAULT_URL
    before: str | None = None
    after: str | None = None
    base_model: str | None = None
    candidate: str | None = None
    adapter: str | None = None
    suites: list[str] = field(default_factory=list)
    rules: CompareRules = field(default_factory=CompareRules)
    finetune_job: str | None = None
    noise_floor: bool = False
    prompt_format: str | None = None
    max_new_tokens: int | None = None
    # Engine of both evaluations ("transformers" or "vllm"); None: the server's default.
    backend: str | None = None
    cache: bool = True
    # Seconds the whole run may take: every request and read, and every wait.
    timeout: float = 3600.0
    poll_seconds: float = 1.0
    # Without a terminal, a line per job this often while waiting (and on every change).
    progress_every: float = 30.0
    junit: Path | None = None
    markdown: Path | None = None
    api_key: str | None = None
    mlflow: str | None = None


def parse_suites(values: Sequence[str] | None) -> list[str]:
    """``--suite`` values; each may also be a comma-separated list of references."""
    return [ref for value in values or () for ref in split_list(value)]


def suite_names(options: GateOptions) -> list[str]:
    """The names of the suites the ``--suite`` references will run (``name@version`` is
    ``name``; a group is its members; options name a derived suite), suite files left out."""
    names = []
    for ref in options.suites:
        if Path(ref).expanduser().is_file():
            continue
        try:
            names += reference_names(ref)
        except InvalidReference as exc:
            raise GateError(f"--suite {ref!r}: {exc}") from None
    return names


def _suite_entry(value: str) -> str | dict[str, Any]:
    """A suite name (``name`` or ``name@version``), or an existing suite JSON file (inlined)."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise GateError(f"cannot read suite file {value!r}: {exc.strerror}") from None
        except ValueError as exc:
            raise GateError(f"suite file {value!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise GateError(f"suite file {value!r} must hold one suite object")
        return data
    return value


def evaluation_body(
    options: GateOptions, model: str, adapter: str | None, label: str
) -> dict[str, Any]:
    """The POST /evaluations body for one side of the comparison."""
    body: dict[str, Any] = {
        "model": {
            "path": model,
            "adapter_path": adapter,
            **({"backend": options.backend} if options.backend else {}),
        },
        "label": label,
        "cache": options.cache,
    }
    if options.suites:
        body["suites"] = [_suite_entry(s) for s in options.suites]
    if options.prompt_format:
        body["prompt_format"] = options.prompt_format
    if options.max_new_tokens is not None:
        body["generation"] = {"max_new_tokens": options.max_new_tokens}
    return body


def noise_floor_body(base: Mapping[str, Any]) -> dict[str, Any]:
    """A rerun of the base evaluation with another batch composition, never from the cache."""
    generation = dict(base.get("generation") or {})
    first, second = NOISE_FLOOR_BATCH_SIZES
    generation["batch_size"] = second if generation.get("batch_size") == first else first
    model = base.get("model") or {}
    if not model.get("path"):
        raise GateError(f"evaluation {base.get('id')} does not say which model it ran")
    return {
        "model": {"path": model["path"], "adapter_path": model.get("adapter_path")},
        "suites": [f"{s['name']}@{s['version']}" for s in base.get("suites") or []],
        "prompt_format": base.get("prompt_format"),
        "generation": generation,
        "label": f"gate: noise floor of {base['id']}",
        "cache": False,
    }


def compare_params(options: GateOptions, ids: Mapping[str, str]) -> dict[str, Any]:
    """Query parameters for ``GET /compare``: the rules that differ from the rule book's
    defaults, and which suites and noise floor to compare."""
    params: dict[str, Any] = {"before": ids["before"], "after": ids["after"]}
    params.update(options.rules.changed())
    names = suite_names(options)
    # With ids given, --suite picks the suites to compare among those both runs have.
    if names and (options.before or options.finetune_job):
        params["suites"] = ",".join(names)
    if ids.get("noise_floor"):
        params["noise_floor"] = ids["noise_floor"]
    return params
