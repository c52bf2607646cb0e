"""A fake forgetguard server on loopback: a real HTTP server in a thread that answers what a test
scripts, including what no forgetguard server would (HTML, arrays, nulls, redirects), nothing at
all, or a byte every so often."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Answer:
    """What the fake server sends for one request.

    ``silent``: read the request and never answer. ``trickle``: send the answer one byte every
    ``trickle`` seconds, from its status line on, or from its body on with ``trickle_body``.
    """

    status: int = 200
    body: bytes | str | Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    silent: bool = False
    trickle: float | None = None
    trickle_body: bool = False

    def encoded(self) -> tuple[bytes, str]:
        if isinstance(self.body, bytes):
            return self.body, self.headers.get("content-type", "application/octet-stream")
        if isinstance(self.body, str):
            return self.body.encode(), self.headers.get("content-type", "text/html")
        return json.dumps(self.body).encode(), self.headers.get("content-type", "application/json")


def json_answer(body: Any, status: int = 200) -> Answer:
    return Answer(status=status, body=body, headers={"content-type": "application/json"})


Route = Callable[[str, str, dict[str, list[str]]], Answer]

HEALTHY = {"status": "ok", "database": "ok"}


def evaluation(evaluation_id: str, status: str = "succeeded", **extra: Any) -> dict[str, Any]:
    """A ``GET /evaluations/{id}`` body like the real server's (the fields the client reads)."""
    return {
        "id": evaluation_id,
        "status": status,
        "progress": {"done": 2, "total": 2, "stage": "qa"},
        "label": None,
        "model": {"path": "models/x", "adapter_path": None},
        "suites": [{"name": "general-qa", "version": 1}],
        "error": None,
        **extra,
    }


def comparison(verdict: str = "pass", **extra: Any) -> dict[str, Any]:
    """A ``GET /compare`` body with every section the reports read."""
    return {
        "before": "ev_a",
        "after": "ev_b",
        "threshold": 0.1,
        "mode": "threshold",
        "verdict": verdict,
        "reasons": [] if verdict == "pass" else ["accuracy dropped 0.500"],
        "overall_accuracy_before": 0.9,
        "overall_accuracy_after": 0.9 if verdict == "pass" else 0.4,
        "accuracy_drop": 0.0 if verdict == "pass" else 0.5,
        "statistics": {
            "accuracy_before": 0.9,
            "accuracy_after": 0.9,
            "drop": 0.0,
            "forgotten": 0,
            "learned": 0,
            "mcnemar_p_value": 1.0,
            "drop_ci95": [0.0, 0.0],
            "n_pairs": 10,
            "confidence": 0.95,
            "min_detectable_drop": None,
            "by_category": {
                "geography": {
                    "accuracy_before": 0.9,
                    "accuracy_after": 0.9,
                    "drop": 0.0,
                    "forgotten": 0,
                    "learned": 0,
                    "mcnemar_p_value": 1.0,
                    "p_value_holm": 1.0,
                }
            },
        },
        "checklist": None,
        "drift": None,
        "flips": {"forgotten": [], "learned": []},
        "findings": [],
        "warnings": [],
        **extra,
    }


def healthy_routes(**overrides: Answer) -> Route:
    """A server whose evaluations ev_a and ev_b succeeded and whose comparison passes;
    ``overrides`` replace the answer for a path (``compare``, ``healthz``, ``ev_a`` …)."""

    def route(method: str, path: str, query: dict[str, list[str]]) -> Answer:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name in overrides:
            return overrides[name]
        if path == "/healthz":
            return json_answer(HEALTHY)
        if path.startswith("/evaluations/"):
            return json_answer(evaluation(name))
        if path == "/compare":
            return json_answer(comparison())
        return json_answer({"title": "Not Found", "status": 404, "detail": path}, 404)

    return route


@contextmanager
def fake_forgetguard(route: Route) -> Iterator[str]:
    """Serve ``route`` on a free loopback port; yields the base URL."""
    stop = threading.Event()
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:  # quiet
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            parts = urlsplit(self.path)
            requests.append(f"{self.command} {parts.path}")
            answer = route(self.command, parts.path, parse_qs(parts.query))
            if answer.silent:
                stop.wait(600)
                self.close_connection = True
                return
            body, kind = answer.encoded()
            head = f"HTTP/1.1 {answer.status} {self.responses.get(answer.status, ('?',))[0]}\r\n"
            headers = {"content-type": kind, "content-length": str(len(body)), **answer.headers}
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            raw = head.encode("latin-1") + body
            try:
                if answer.trickle is None:
                    self.wfile.write(raw)
                    return
                start = len(head) if answer.trickle_body else 0
                self.wfile.write(raw[:start])
                self.wfile.flush()
                for i in range(start, len(raw)):
                    if stop.wait(answer.trickle):
                        break
                    self.wfile.write(raw[i : i + 1])
                    self.wfile.flush()
            except OSError:  # the client gave up: that is the point
                self.close_connection = True

        do_GET = do_POST = do_HEAD = _answer  # noqa: N815

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def elapsed_since(started: float) -> float:
    return time.monotonic() - started
