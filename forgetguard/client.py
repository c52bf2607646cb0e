"""A typed, synchronous Python client for a forgetguard server.

It needs nothing of the server: only ``httpx`` and ``pydantic``. What it raises is always one of
its own errors (:class:`ForgetguardError`):

- :class:`ProblemError`: the server refused a request (RFC 9457 problem+json, or any other
  error status, its text made one safe line);
- :class:`MalformedResponse`: the server answered something a forgetguard server does not (an
  HTML page, a JSON array, a missing or null field, a redirect, a body beyond the size budget);
- :class:`Unreachable`: no answer after retries;
- :class:`Timeout`: the client's ``deadline`` passed (reads included), or :meth:`Client.wait`'s;
- :class:`JobFailed`: a job waited for ended ``failed`` or ``cancelled``.

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
import math
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from forgetguard.rules import CompareRules
from forgetguard.status import FINISHED, UNSUCCESSFUL, JobStatus
from forgetguard.text import one_line

__all__ = [
    "Client",
    "Comparison",
    "Evaluation",
    "EvaluationGroup",
    "FinetuneJob",
    "ForgetguardError",
    "JobFailed",
    "MalformedResponse",
    "ProblemError",
    "Progress",
    "Timeout",
    "Unreachable",
    "idempotency_key",
]

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({502, 503, 504})
# The largest answer read (decoded); a comparison of 10,000 items with their answers stays far
# below it. Beyond it the answer is refused as malformed instead of growing without bound.
MAX_RESPONSE_BYTES = 128 * 1024 * 1024
# Environment variables that identify one CI pipeline run across retries of its steps.
RUN_ID_VARS = (
    "FORGETGUARD_RUN_ID",
    "GITHUB_RUN_ID",
    "CI_PIPELINE_ID",
    "BUILD_TAG",
    "CIRCLE_WORKFLOW_ID",
    "BUILDKITE_BUILD_ID",
)
# Scopes idempotency keys to this process when nothing else identifies the request's context.
_PROCESS_NONCE = secrets.token_hex(8)
# httpcore trace events whose return value is a connection's network stream.
_CONNECTED = frozenset(
    {
        "connection.connect_tcp.complete",
        "connection.connect_unix_socket.complete",
        "connection.start_tls.complete",
    }
)


class ForgetguardError(Exception):
    """Base class of everything this client raises."""


class Unreachable(ForgetguardError):
    """The server did not answer (after retries)."""


class Timeout(ForgetguardError, TimeoutError):
    """Time ran out: the client's ``deadline``, or the ``timeout`` of :meth:`Client.wait`."""


class WaitTimeout(Timeout):
    """:meth:`Client.wait` ran out of time; ``pending`` are the jobs not yet finished."""

    def __init__(self, timeout: float, pending: Sequence[Evaluation | FinetuneJob]) -> None:
        self.timeout = timeout
        self.pending = list(pending)
        shown = ", ".join(
            f"{j.id} {j.status} {j.progress.done}/{j.progress.total}" for j in self.pending
        )
        super().__init__(f"timed out after {timeout:g} s waiting for {shown}")


class ProblemError(ForgetguardError):
    """The server refused a request; ``problem`` is its RFC 9457 body as sent.

    ``detail`` and the message are the problem's detail made one safe line (control characters
    escaped, cut to a bound), fit to print.
    """

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
        self.title = one_line(problem.get("title") or "")
        self.detail = one_line(problem.get("detail") or problem.get("title") or "")
        if self.about_the_key:
            message = (
                f"the server refused the request ({status}): {self.detail}; "
                "set FORGETGUARD_API_KEY to a key with the right scope"
            )
        else:
            message = f"{method} {path} failed ({status}): {self.detail}"
        super().__init__(message)

    @property
    def about_the_key(self) -> bool:
        """The auth layer refused the API key (only its refusals carry WWW-Authenticate; a 403
        for a path outside the allowed roots is not about the key, and says so itself)."""
        return self.status == 401 or (self.status == 403 and "www-authenticate" in self.headers)


class MalformedResponse(ForgetguardError):
    """The server answered something a forgetguard server does not answer."""

    def __init__(self, method: str, path: str, what: str) -> None:
        self.method = method
        self.path = path
        super().__init__(
            f"{method} {path}: the server's answer is not a forgetguard answer: {one_line(what)}"
        )


class JobFailed(ForgetguardError):
    """A job this client waited for ended ``failed`` or ``cancelled``."""

    def __init__(self, job: Evaluation | FinetuneJob) -> None:
        self.job = job
        super().__init__(f"{job.id} {job.status}: {one_line(job.error or 'no reason given')}")


class _View(BaseModel):
    # The server may add fields; a client built today keeps working with them.
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Progress(_View):
    """The current stage's ``done`` of ``total``; the whole job's ``percent`` and ETA."""

    done: int = 0
    total: int = 0
    stage: str = ""
    percent: float | None = None
    eta_seconds: float | None = None


class SuiteRun(_View):
    """A suite an evaluation ran: its name and version."""

    name: str
    version: int | str | None = None


class Evaluation(_View):
    """``GET /evaluations/{id}``."""

    id: str
    status: JobStatus
    progress: Progress
    label: str | None = None
    model: dict[str, Any] = {}
    suites: list[SuiteRun] = []
    prompt_format: str | None = None
    generation: dict[str, Any] = {}
    results: dict[str, Any] | None = None
    cached_from: str | None = None
    error: str | None = None


class EvaluationGroup(_View):
    """The evaluations one ``POST /evaluations`` with ``model.adapters`` queued, in the order
    the adapters were listed (``GET /evaluations?group=``)."""

    group: str
    data: list[Evaluation] = []

    @property
    def ids(self) -> list[str]:
        return [evaluation.id for evaluation in self.data]


class FinetuneJob(_View):
    """``GET /finetune-jobs/{id}``."""

    id: str
    status: JobStatus
    progress: Progress
    method: str | None = None
    base_model: dict[str, Any] = {}
    before_evaluation_id: str | None = None
    after_evaluation_id: str | None = None
    output_path: str | None = None
    comparison: dict[str, Any] | None = None
    warnings: list[Any] = []
    error: str | None = None


# --- the comparison: the fields reports read, with the types they read them as


class CategoryStats(_View):
    accuracy_before: float
    accuracy_after: float
    drop: float
    forgotten: int
    learned: int
    mcnemar_p_value: float | None = None
    p_value_holm: float | None = None


class Statistics(CategoryStats):
    drop_ci95: tuple[float, float]  # dumped (mode="json") as the list the server sent
    n_pairs: int
    confidence: float
    min_detectable_drop: float | None = None
    by_category: dict[str, CategoryStats] = {}


class ChecklistFailure(_View):
    test: str
    severity: str | None = None
    response_after: str | None = None


class ChecklistItem(_View):
    suite: str
    test: str
    severity: str | None = None
    passed_before: bool
    passed_after: bool


class Checklist(_View):
    score_before: float
    score_after: float
    newly_failing: list[ChecklistFailure] = []
    items: list[ChecklistItem] = []


class DriftSuite(_View):
    nll_per_token_before: float
    nll_per_token_after: float
    relative_change: float
    kl_per_token: float | None = None


class Drift(_View):
    suites: dict[str, DriftSuite] = {}


class Flip(_View):
    item_id: str
    question: str | None = None
    response_before: str | None = None
    response_after: str | None = None


class Flips(_View):
    forgotten: list[Flip] = []
    learned: list[Flip] = []


class Finding(_View):
    rule: str
    subject: str
    message: str
    gates: bool


class Message(_View):
    message: str


class NoiseFloor(_View):
    churn: int
    items: int
    evaluation: str


class Comparison(_View):
    """``GET /compare``: the lesson's keys, then checklist, flips, statistics, drift, verdict.

    The fields the gate's reports read are typed: an answer without them, or with another
    type, is a :class:`MalformedResponse`, never a crash halfway through a report.
    """

    before: str
    after: str
    threshold: float
    mode: str
    overall_accuracy_before: float | None = None
    overall_accuracy_after: float | None = None
    accuracy_drop: float | None = None
    catastrophic_forgetting_detected: bool | None = None
    recommendation: str | None = None
    verdict: Literal["pass", "fail"]
    # The verdict and its main reason in words, as every surface states it (None: a server
    # from before headlines).
    headline: str | None = None
    reasons: list[str] = []
    statistics: Statistics | None = None
    checklist: Checklist | None = None
    drift: Drift | None = None
    flips: Flips = Flips()
    findings: list[Finding] = []
    warnings: list[Message] = []
    noise_floor: NoiseFloor | None = None
    note: str | None = None
    same_run: bool = False
    # The guard's reading (``max_drop``, ``drop``, ``acceptable``); it never changes the verdict.
    guard: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        """True when the verdict is ``pass``."""
        return self.verdict == "pass"


_Model = TypeVar("_Model", bound=BaseModel)


def _local_signature(*paths: str | None) -> list[Any]:
    """Names, sizes and mtimes of the model files, when this machine can see them."""
    signature: list[Any] = []
    for raw in paths:
        if not isinstance(raw, str):
            continue
        directory = Path(raw).expanduser()
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.is_file():
                stat = path.stat()
                signature.append([raw, path.name, stat.st_size, stat.st_mtime_ns])
    return signature


def idempotency_key(body: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> str:
    """A key derived from the request and its context, stable across retries of one CI step.

    It covers the body, the CI run (``GITHUB_RUN_ID``, ``CI_PIPELINE_ID``, …) and the model
    files' sizes and mtimes when they are visible here (a model retrained in place gets a new
    key). With neither a CI run nor local files the key is scoped to this process, so a stale
    result is never replayed for changed weights.
    """
    env = os.environ if environ is None else environ
    run = next((f"{name}={env[name]}" for name in RUN_ID_VARS if env.get(name)), None)
    model = body.get("model") or body.get("base_model") or {}
    files = _local_signature(model.get("path"), model.get("adapter_path"))
    if run is None and not files:
        run = f"process={_PROCESS_NONCE}"
    content = {"body": body, "run": run, "files": files}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "fg-" + hashlib.sha256(canonical.encode()).hexdigest()[:48]


def _evaluation_body(
    model: dict[str, Any],
    *,
    suites: Sequence[str | Mapping[str, Any]] | None,
    prompt_format: str | None,
    max_new_tokens: int | None,
    label: str | None,
    cache: bool,
    generation: Mapping[str, Any] | None,
    shards: int | None = None,
) -> dict[str, Any]:
    """A ``POST /evaluations`` body: only what the caller set (the server has the defaults)."""
    body: dict[str, Any] = {"model": model, "cache": cache}
    if shards is not None:
        body["shards"] = shards
    if suites is not None:
        body["suites"] = [s if isinstance(s, str) else dict(s) for s in suites]
    if prompt_format is not None:
        body["prompt_format"] = prompt_format
    if generation or max_new_tokens is not None:
        body["generation"] = dict(generation or {})
        if max_new_tokens is not None:
            body["generation"]["max_new_tokens"] = max_new_tokens
    if label is not None:
        body["label"] = label
    return body


class Client:
    """A forgetguard server. Transport errors and 502/503/504 are retried with backoff.

    ``timeout`` bounds each read; ``deadline`` (a ``clock()`` time) bounds everything this
    client does, reads included: a server that never answers or trickles a byte at a time is
    cut off there with :class:`Timeout`.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        http: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.url = url or os.environ.get("FORGETGUARD_URL", DEFAULT_URL)
        key = api_key if api_key is not None else os.environ.get("FORGETGUARD_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._own = http is None
        self.http = http or httpx.Client(base_url=self.url, headers=headers)
        self.timeout = timeout
        self.retries = retries
        self.sleep = sleep
        self.deadline = deadline
        self.clock = clock
        self.max_response_bytes = max_response_bytes
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (when this client opened it)."""
        if self._own:
            self.http.close()

    # ------------------------------------------------------------------ transport

    def _remaining(self, what: str) -> float:
        """Seconds left before the deadline (``inf`` without one); Timeout when none are."""
        if self.deadline is None:
            return math.inf
        left = self.deadline - self.clock()
        if left <= 0:
            raise Timeout(f"ran out of time before {what} finished (the server is slow or silent)")
        return left

    def _trace(self, event: str, info: Mapping[str, Any]) -> None:
        # Remember every socket this client connects, so the deadline can cut them off.
        if event in _CONNECTED and (stream := info.get("return_value")) is not None:
            with suppress(Exception):
                if (sock := stream.get_extra_info("socket")) is not None:
                    self._sockets.add(sock)

    def _cut_off(self) -> None:
        # A read blocked in recv() returns at once once its socket is shut down.
        for sock in list(self._sockets):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @contextmanager
    def _bounded(self, seconds: float) -> Iterator[None]:
        if math.isinf(seconds):
            yield
            return
        timer = threading.Timer(seconds, self._cut_off)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _exchange(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request and its whole body, within the deadline and the size budget."""
        left = self._remaining(f"{method} {path}")
        read = min(self.timeout, left)
        request = self.http.build_request(
            method,
            path,
            # (connect, read, write, pool) as a plain tuple: any httpx-compatible client takes it
            # (a Starlette TestClient may be built on httpx2, whose Timeout class differs).
            timeout=(min(5.0, read), read, read, read),
            extensions={"trace": self._trace},
            **kwargs,
        )
        with self._bounded(left):
            response = self.http.send(request, stream=True)
            try:
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > self.max_response_bytes:
                        raise MalformedResponse(
                            method, path, f"more than {self.max_response_bytes:,} bytes"
                        )
            finally:
                response.close()
        # The body, read once, becomes the response's content.
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            content=bytes(body),
            request=request,
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send with retries and decode JSON; POSTs are retried only with an Idempotency-Key."""
        what = f"{method} {path}"
        for attempt in range(self.retries + 1):
            try:
                response = self._exchange(method, path, **kwargs)
            except httpx.TransportError as exc:
                self._remaining(what)  # cut off by the deadline: a Timeout, not Unreachable
                if attempt == self.retries:
                    raise Unreachable(
                        f"cannot reach the forgetguard server at {self.url}: "
                        f"{exc.__class__.__name__}: {one_line(str(exc) or 'no response')}"
                    ) from None
            except httpx.InvalidURL as exc:
                raise Unreachable(f"the server URL {self.url!r} is not valid: {exc}") from None
            except httpx.HTTPError as exc:  # a body that does not decode, …
                raise MalformedResponse(method, path, f"{exc.__class__.__name__}: {exc}") from None
            else:
                if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                    return self._decoded(response, method, path)
            self.sleep(min(0.25 * 2**attempt, self._remaining(what)))
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _decoded(response: httpx.Response, method: str, path: str) -> Any:
        status = response.status_code
        if status >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = None
            if not isinstance(problem, dict):
                text = response.text.strip() or response.reason_phrase
                problem = {"title": response.reason_phrase, "detail": text}
            raise ProblemError(status, problem, method, path, response.headers)
        if not 200 <= status < 300:
            where = response.headers.get("location")
            raise MalformedResponse(
                method,
                path,
                f"status {status}"
                + (f" (to {where})" if where else "")
                + "; a forgetguard server does not redirect: check the server URL",
            )
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("content-type") or "no content type"
            raise MalformedResponse(
                method, path, f"status {status} with a body that is not JSON ({kind})"
            ) from None

    def _get_object(self, path: str, **kwargs: Any) -> dict[str, Any]:
        data = self.request("GET", path, **kwargs)
        if not isinstance(data, dict):
            raise MalformedResponse("GET", path, f"a JSON {type(data).__name__}, not an object")
        return data

    @staticmethod
    def _view(model: type[_Model], data: Any, method: str, path: str) -> _Model:
        """``data`` as ``model``; what does not fit is a MalformedResponse naming the field."""
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the body"
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise MalformedResponse(method, path, f"{where}: {first['msg']}{more}") from None

    def _post(self, path: str, body: Mapping[str, Any], key: str | None) -> Any:
        headers = {"Idempotency-Key": key or idempotency_key(body)}
        return self.request("POST", path, json=dict(body), headers=headers)

    # ------------------------------------------------------------------ resources

    def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        return self._get_object("/healthz")

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
        generation: Mapping[str, Any] | None = None,
        shards: int | None = None,
        idempotency_key: str | None = None,
    ) -> Evaluation:
        """Queue an evaluation (``POST /evaluations``); ``model`` adds fields such as a backend,
        ``generation`` settings beside ``max_new_tokens``; ``shards`` splits it into that many
        jobs that several workers run (one evaluation, as if unsharded)."""
        body = _evaluation_body(
            {"path": model_path, "adapter_path": adapter_path, **(model or {})},
            suites=suites,
            prompt_format=prompt_format,
            max_new_tokens=max_new_tokens,
            label=label,
            cache=cache,
            generation=generation,
            shards=shards,
        )
        return self.submit_evaluation(body, idempotency_key=idempotency_key)

    def evaluate_adapters(
        self,
        model_path: str,
        adapters: Sequence[str],
        *,
        suites: Sequence[str | Mapping[str, Any]] | None = None,
        prompt_format: str | None = None,
        max_new_tokens: int | None = None,
        label: str | None = None,
        cache: bool = True,
        model: Mapping[str, Any] | None = None,
        generation: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> EvaluationGroup:
        """Queue one evaluation per adapter of one base (``model.adapters``): a worker loads
        the base once and switches adapters. Wait on ``group.ids``; :meth:`evaluation_group`
        reads the group again."""
        body = _evaluation_body(
            {"path": model_path, "adapters": list(adapters), **(model or {})},
            suites=suites,
            prompt_format=prompt_format,
            max_new_tokens=max_new_tokens,
            label=label,
            cache=cache,
            generation=generation,
        )
        data = self._post("/evaluations", body, idempotency_key)
        return self._view(EvaluationGroup, data, "POST", "/evaluations")

    def evaluation_group(self, group_id: str) -> EvaluationGroup:
        """``GET /evaluations?group=``: the group's evaluations, newest first as every
        listing is (each one's ``model["adapter_path"]`` says which adapter it ran)."""
        params = {"group": group_id, "limit": 500}
        page = self._get_object("/evaluations", params=params)
        group = {"group": group_id, "data": page.get("data", [])}
        return self._view(EvaluationGroup, group, "GET", "/evaluations")

    def submit_evaluation(
        self, body: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> Evaluation:
        """``POST /evaluations`` with a body as SPEC §3 describes it."""
        data = self._post("/evaluations", body, idempotency_key)
        return self._view(Evaluation, data, "POST", "/evaluations")

    def evaluation(self, evaluation_id: str) -> Evaluation:
        """``GET /evaluations/{id}``."""
        path = f"/evaluations/{evaluation_id}"
        return self._view(Evaluation, self.request("GET", path), "GET", path)

    def finetune(
        self, body: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> FinetuneJob:
        """Queue a fine-tune job (``POST /finetune-jobs``) with the body SPEC §5 describes."""
        data = self._post("/finetune-jobs", body, idempotency_key)
        return self._view(FinetuneJob, data, "POST", "/finetune-jobs")

    def finetune_job(self, job_id: str) -> FinetuneJob:
        """``GET /finetune-jobs/{id}``."""
        path = f"/finetune-jobs/{job_id}"
        return self._view(FinetuneJob, self.request("GET", path), "GET", path)

    def compare(
        self,
        before: str,
        after: str,
        *,
        rules: CompareRules | None = None,
        **options: Any,
    ) -> Comparison:
        """``GET /compare`` under ``rules`` (only those changed from their defaults are sent);
        ``options`` are its other query parameters (``suites``, ``noise_floor`` …) and may
        name rules too (``threshold=0.05``)."""
        params: dict[str, Any] = {"before": before, "after": after}
        params.update((rules or CompareRules()).changed())
        for name, value in options.items():
            if isinstance(value, list | tuple):
                value = ",".join(str(v) for v in value)  # suites=["a", "b"] → "a,b"
            if value is not None:
                params[name] = value
        return self._view(
            Comparison, self.request("GET", "/compare", params=params), "GET", "/compare"
        )

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
        clock: Callable[[], float] | None = None,
    ) -> list[Evaluation | FinetuneJob]:
        """Poll until every job finished; ``on_progress`` sees each poll's state.

        A server that stops answering after a job was seen once (a restart) is waited for until
        the time runs out. Raises :class:`JobFailed` for a failed or cancelled job (unless
        ``raise_on_failure`` is false) and :class:`Timeout` when ``timeout`` seconds (or the
        client's deadline) pass first.
        """
        clock = clock or self.clock
        deadline = clock() + timeout
        if self.deadline is not None and clock is self.clock:
            deadline = min(deadline, self.deadline)  # the wait ends first, and says so
        latest: dict[str, Evaluation | FinetuneJob] = {}
        while True:
            for job_id in job_ids:
                if job_id in latest and latest[job_id].status in FINISHED:
                    continue
                if job_id in latest and clock() >= deadline:
                    break
                try:
                    latest[job_id] = self.get(job_id)
                except Unreachable:
                    if job_id not in latest or clock() >= deadline:
                        raise
                    continue  # a server restart mid-wait: keep waiting until the deadline
                if on_progress:
                    on_progress(latest[job_id])
            failed = [j for j in latest.values() if j.status in UNSUCCESSFUL]
            if failed and raise_on_failure:
                raise JobFailed(failed[0])
            if all(j.status in FINISHED for j in latest.values()):
                return [latest[j] for j in job_ids]
            if clock() >= deadline:
                raise WaitTimeout(timeout, [j for j in latest.values() if j.status not in FINISHED])
            self.sleep(min(poll_seconds, max(0.0, deadline - clock())))
