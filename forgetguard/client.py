"""A typed, synchronous Python client for a forgetguard server.

It needs nothing of the server: only ``httpx`` and ``pydantic``. Errors the server answers
with (RFC 9457 problem+json) are raised as :class:`ProblemError` carrying the problem; a server
that cannot be reached after retries raises :class:`Unreachable`.

    from forgetguard import Client

    with Client("http://127.0.0.1:8000") as fg:
        base = fg.evaluate("models/smollm2-135m-instruct", suites=["general-qa"])
        tuned = fg.evaluate("models/smollm2-135m-instruct", adapter_path="models/my-adapter",
                            suites=["general-qa"])
        fg.wait(base.id, tuned.id)
        print(fg.compare(base.id, tuned.id).verdict)   # "pass" or "fail"
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict

__all__ = [
    "Client",
    "Comparison",
    "Evaluation",
    "FinetuneJob",
    "ForgetguardError",
    "ProblemError",
    "Progress",
    "Unreachable",
]

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({502, 503, 504})
FINISHED = frozenset({"succeeded", "failed", "cancelled"})


class ForgetguardError(Exception):
    """Base class of everything this client raises."""


class Unreachable(ForgetguardError):
    """The server did not answer (after retries)."""


class ProblemError(ForgetguardError):
    """The server refused a request; ``problem`` is its RFC 9457 body."""

    def __init__(
        self,
        status: int,
        problem: Mapping[str, Any],
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.problem = dict(problem)
        self.method = method
        self.path = path
        self.title = str(problem.get("title") or "")
        self.detail = str(problem.get("detail") or problem.get("title") or "")
        super().__init__(f"{method} {path} failed ({status}): {self.detail}")


class JobFailed(ForgetguardError):
    """A job this client waited for ended ``failed`` or ``cancelled``."""

    def __init__(self, job: Evaluation | FinetuneJob) -> None:
        self.job = job
        super().__init__(f"{job.id} {job.status}: {job.error or 'no reason given'}")


class _View(BaseModel):
    # The server may add fields; a client built today keeps working with them.
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Progress(_View):
    done: int = 0
    total: int = 0
    stage: str = ""


class Evaluation(_View):
    """``GET /evaluations/{id}``."""

    id: str
    status: str
    progress: Progress
    label: str | None = None
    model: dict[str, Any] = {}
    results: dict[str, Any] | None = None
    cached_from: str | None = None
    error: str | None = None


class FinetuneJob(_View):
    """``GET /finetune-jobs/{id}``."""

    id: str
    status: str
    progress: Progress
    before_evaluation_id: str | None = None
    after_evaluation_id: str | None = None
    output_path: str | None = None
    comparison: dict[str, Any] | None = None
    warnings: list[str] = []
    error: str | None = None


class Comparison(_View):
    """``GET /compare``: the lesson's keys, then checklist, flips, statistics, drift, verdict."""

    overall_accuracy_before: float | None = None
    overall_accuracy_after: float | None = None
    accuracy_drop: float | None = None
    catastrophic_forgetting_detected: bool | None = None
    recommendation: str | None = None
    verdict: str
    reasons: list[Any] = []

    @property
    def passed(self) -> bool:
        """True when the verdict is ``pass``."""
        return self.verdict == "pass"


def idempotency_key(body: Mapping[str, Any]) -> str:
    """A key from the request body and the process: retries of one call never create twice."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "fg-client-" + hashlib.sha256(f"{os.getpid()}:{canonical}".encode()).hexdigest()[:40]


class Client:
    """A forgetguard server. Transport errors and 502/503/504 are retried with backoff."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        http: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url or os.environ.get("FORGETGUARD_URL", DEFAULT_URL)
        key = api_key if api_key is not None else os.environ.get("FORGETGUARD_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._own = http is None
        self.http = http or httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0)
        )
        self.retries = retries
        self.sleep = sleep

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (when this client opened it)."""
        if self._own:
            self.http.close()

    # ------------------------------------------------------------------ transport

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send with retries and decode JSON; POSTs are retried only with an Idempotency-Key."""
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise Unreachable(
                        f"cannot reach the forgetguard server at {self.url}: "
                        f"{exc.__class__.__name__}: {exc or 'no response'}"
                    ) from None
            else:
                if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                    return self._decoded(response, method, path)
            self.sleep(0.25 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _decoded(response: httpx.Response, method: str, path: str) -> Any:
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.reason_phrase, "detail": response.text[:300]}
            if not isinstance(problem, dict):
                problem = {"detail": str(problem)[:300]}
            raise ProblemError(response.status_code, problem, method, path, response.headers)
        return response.json()

    def _post(self, path: str, body: Mapping[str, Any], key: str | None) -> Any:
        headers = {"Idempotency-Key": key or idempotency_key(body)}
        return self.request("POST", path, json=dict(body), headers=headers)

    # ------------------------------------------------------------------ resources

    def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        return dict(self.request("GET", "/healthz"))

    def evaluate(
        self,
        model_path: str,
        *,
        suites: Sequence[str | Mapping[str, Any]] | None = None,
        adapter_path: str | None = None,
        prompt_format: str | None = None,
        max_new_tokens: int | None = None,
        label: str | None = None,
        cache: bool = True,
        model: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Evaluation:
        """Queue an evaluation (``POST /evaluations``); ``model`` adds fields such as a backend."""
        body: dict[str, Any] = {
            "model": {"path": model_path, "adapter_path": adapter_path, **(model or {})},
            "cache": cache,
        }
        if suites is not None:
            body["suites"] = [s if isinstance(s, str) else dict(s) for s in suites]
        if prompt_format is not None:
            body["prompt_format"] = prompt_format
        if max_new_tokens is not None:
            body["generation"] = {"max_new_tokens": max_new_tokens}
        if label is not None:
            body["label"] = label
        return Evaluation.model_validate(self._post("/evaluations", body, idempotency_key))

    def evaluation(self, evaluation_id: str) -> Evaluation:
        """``GET /evaluations/{id}``."""
        return Evaluation.model_validate(self.request("GET", f"/evaluations/{evaluation_id}"))

    def finetune(
        self, body: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> FinetuneJob:
        """Queue a fine-tune job (``POST /finetune-jobs``) with the body SPEC §5 describes."""
        return FinetuneJob.model_validate(self._post("/finetune-jobs", body, idempotency_key))

    def finetune_job(self, job_id: str) -> FinetuneJob:
        """``GET /finetune-jobs/{id}``."""
        return FinetuneJob.model_validate(self.request("GET", f"/finetune-jobs/{job_id}"))

    def compare(
        self,
        before: str,
        after: str,
        *,
        threshold: float = 0.10,
        **options: Any,
    ) -> Comparison:
        """``GET /compare``; ``options`` are its other query parameters (``mode``, ``suites`` …)."""
        params: dict[str, Any] = {"before": before, "after": after, "threshold": threshold}
        for name, value in options.items():
            if isinstance(value, list | tuple):
                value = ",".join(str(v) for v in value)  # suites=["a", "b"] → "a,b"
            if value is not None:
                params[name] = value
        return Comparison.model_validate(self.request("GET", "/compare", params=params))

    def get(self, job_id: str) -> Evaluation | FinetuneJob:
        """An evaluation (``ev_…``) or a fine-tune job (``ft_…``) by id."""
        return self.finetune_job(job_id) if job_id.startswith("ft_") else self.evaluation(job_id)

    def wait(
        self,
        *job_ids: str,
        timeout: float = 3600.0,
        poll_seconds: float = 1.0,
        on_progress: Callable[[Evaluation | FinetuneJob], None] | None = None,
        raise_on_failure: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> list[Evaluation | FinetuneJob]:
        """Poll until every job finished; ``on_progress`` sees each poll's state.

        Raises :class:`JobFailed` for a failed or cancelled job (unless ``raise_on_failure`` is
        false) and ``TimeoutError`` when ``timeout`` seconds pass first.
        """
        deadline = clock() + timeout
        latest: dict[str, Evaluation | FinetuneJob] = {}
        while True:
            for job_id in job_ids:
                if job_id in latest and latest[job_id].status in FINISHED:
                    continue
                latest[job_id] = self.get(job_id)
                if on_progress:
                    on_progress(latest[job_id])
            failed = [j for j in latest.values() if j.status in ("failed", "cancelled")]
            if failed and raise_on_failure:
                raise JobFailed(failed[0])
            if all(j.status in FINISHED for j in latest.values()):
                return [latest[j] for j in job_ids]
            if clock() >= deadline:
                pending = ", ".join(
                    f"{j.id} {j.status} {j.progress.done}/{j.progress.total}"
                    for j in latest.values()
                    if j.status not in FINISHED
                )
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {pending}")
            self.sleep(poll_seconds)
