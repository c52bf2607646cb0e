"""A fake OpenAI-compatible server on loopback (a real HTTP server in a thread), which answers
well or lies in one chosen way: non-finite or impossible log-probabilities, misaligned
offsets, wrong shapes, bytes trickled one at a time, bodies far too large."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "fake"


def _tokens(text: str) -> list[tuple[str, int]]:
    """Whitespace-led tokens of ``text`` with their character offsets."""
    tokens, start = [], 0
    for index in range(1, len(text) + 1):
        if index == len(text) or text[index] == " ":
            tokens.append((text[start:index], start))
            start = index
    return tokens


def echo_logprobs(text: str) -> dict[str, Any]:
    """``logprobs`` of an echo completion of ``text`` plus one generated token, as vLLM gives."""
    tokens = [*_tokens(text), (" x", len(text))]
    return {
        "tokens": [t for t, _ in tokens],
        "token_logprobs": [None] + [-0.5] * (len(tokens) - 1),
        "text_offset": [o for _, o in tokens],
        "top_logprobs": [None] + [{t: -0.5} for t, _ in tokens[1:]],
    }


# mode -> how the echoed logprobs (or the whole body) are spoiled
def _spoil(mode: str, body: dict[str, Any]) -> Any:
    logprobs = body["choices"][0].get("logprobs")
    if mode == "nan" and logprobs:
        logprobs["token_logprobs"][1] = float("nan")
    elif mode == "minus-infinity" and logprobs:
        logprobs["token_logprobs"][1] = float("-inf")
    elif mode == "huge-logprob" and logprobs:
        logprobs["token_logprobs"][1] = -1e300
    elif mode == "positive-logprob" and logprobs:
        logprobs["token_logprobs"][1] = 3.5
    elif mode == "short-offsets" and logprobs:
        logprobs["text_offset"] = logprobs["text_offset"][:-2]
    elif mode == "string-logprobs" and logprobs:
        logprobs["token_logprobs"] = [None] + ["-0.5"] * (len(logprobs["tokens"]) - 1)
    elif mode == "nan-top" and logprobs:
        logprobs["top_logprobs"][1] = {"a": float("nan")}
    elif mode == "list-body":
        return [body]
    elif mode == "choices-object":
        body["choices"] = {"0": body["choices"][0]}
    elif mode == "text-number":
        body["choices"][0]["text"] = 42
        if "message" in body["choices"][0]:
            body["choices"][0]["message"]["content"] = ["a", "list"]
    return body


class FakeServer:
    """The server's state: its mode, what it received, and where it listens."""

    def __init__(self, mode: str = "ok", completion: str = " Paris.") -> None:
        self.mode = mode
        self.completion = completion
        self.requests: list[tuple[str, Any]] = []
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, path: str, body: Any) -> Any:
        if path.endswith("/models"):
            return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "t"}]}
        if path.endswith("/chat/completions"):
            choice = {"index": 0, "message": {"role": "assistant", "content": self.completion}}
            return _spoil(self.mode, {"choices": [choice]})
        if body.get("echo"):
            choice = {
                "index": 0,
                "text": body["prompt"] + " x",
                "logprobs": echo_logprobs(body["prompt"]),
            }
        else:
            choice = {"index": 0, "text": self.completion, "logprobs": None}
        return _spoil(self.mode, {"choices": [choice]})


def _handler(server: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: Any) -> None:
            pass

        def _reply(self, payload: Any) -> None:
            mode = server.mode
            if mode == "trickle":
                # Headers at once, then the body a byte a second: every read succeeds in time.
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                try:
                    for _ in range(600):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(1.0)
                except OSError:
                    pass
                return
            if mode == "huge-body" or (mode == "huge-models" and self.path.endswith("/models")):
                # 200 MB of one JSON string, streamed without a length.
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    self._chunk(b'{"object": "list", "data": [{"id": "')
                    block = b"m" * (1 << 20)
                    for _ in range(200):
                        self._chunk(block)
                    self._chunk(b'"}]}')
                    self._chunk(b"")
                except OSError:
                    pass
                return
            raw = json.dumps(payload).encode()  # NaN and Infinity as Python writes them
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        def do_GET(self) -> None:  # noqa: N802
            server.requests.append((self.path, None))
            self._reply(server.answer(self.path, {}))

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            server.requests.append((self.path, body))
            self._reply(server.answer(self.path, body))

    return Handler


@contextmanager
def fake_openai(mode: str = "ok", completion: str = " Paris.") -> Iterator[FakeServer]:
    """A fake server listening on a free loopback port while the block runs."""
    server = FakeServer(mode, completion)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    httpd.daemon_threads = True
    server.httpd = httpd
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
