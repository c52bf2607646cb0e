"""A model already served by an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, Ollama).

``plain`` prompts go to ``/completions``, ``chat`` prompts to ``/chat/completions`` (the
server applies the model's chat template), greedy (``temperature: 0``). Log-likelihoods and
token NLL come from ``/completions`` with ``echo`` + ``logprobs``, as lm-evaluation-harness's
``local-completions`` does; a server that does not return prompt log-probabilities raises
:class:`UnsupportedRequest`, and a chat prompt cannot be scored this way at all.

What a server answers is not trusted:

- every request has an **overall deadline** (``FORGETGUARD_ENDPOINT_TIMEOUT_SECONDS``: connect,
  headers and body together, so a server that trickles a byte every few seconds cannot hold a
  job), and its body is read up to a **size cap** (``FORGETGUARD_ENDPOINT_MAX_RESPONSE_BYTES``)
  and no further;
- every field used is **validated** (:class:`_Reader`): expected types, lists of equal length,
  log-probabilities finite and at most 0. A violation is :class:`InvalidAnswer`, which names
  the field and fails the evaluation at once (:class:`BadAnswer`): nothing of it is stored;
- requests run on an event loop that asks ``check_stop`` several times a second, so a cancelled
  job (or a stopping worker) abandons its requests in flight within a second or so.

The weights are not here to hash: :func:`served_fingerprint` hashes what the server reports
about the model (``/models``) and its greedy answers to a few fixed prompts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from app.core.config import ENDPOINT_MAX_RESPONSE_BYTES, ENDPOINT_TIMEOUT_SECONDS
from workers.engine.base import Backend, BadAnswer, EngineInfo, Prompt, UnsupportedRequest

T = TypeVar("T")

# Requests in flight at once: servers batch concurrent requests (continuous batching).
DEFAULT_CONCURRENCY = 16
TIMEOUT_SETTING = "FORGETGUARD_ENDPOINT_TIMEOUT_SECONDS"
MAX_RESPONSE_SETTING = "FORGETGUARD_ENDPOINT_MAX_RESPONSE_BYTES"
# How often requests in flight look at ``check_stop`` (cancelled job, stopping worker).
STOP_POLL_SECONDS = 0.25
# A log-probability is at most 0. Servers compute it in floating point; a hair above 0 is
# rounding (taken as 0), anything more is not a probability. Below the floor is no real
# model's answer either (float16 logits span at most ~1.3e5), and sums of such would overflow.
LOGPROB_ROUNDING = 1e-4
LOGPROB_FLOOR = -1e6
PROBE_PROMPTS = (
    "The capital of France is",
    "1, 2, 3, 4, 5,",
    "Water is made of",
)
PROBE_TOKENS = 12
# Fields of a /models entry that describe the model; "created" is a timestamp some servers
# set to the time of the request, so it is left out.
MODEL_FIELDS = ("id", "object", "owned_by", "root", "parent", "max_model_len")
FINGERPRINT_BASIS = (
    "served model: the server's /models entry and its greedy answers to fixed probe prompts "
    "(the weights were not hashed)"
)


class EndpointError(Exception):
    """The server could not be used (unreachable, an HTTP error status): another attempt may
    find it working again."""


class InvalidAnswer(EndpointError, BadAnswer):
    """The server answered, but not what can be scored: names the route and the field.

    Permanent (a :class:`BadAnswer`): the evaluation fails at once, nothing of it is stored.
    """


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [pos for pos in (text.find(s) for s in stop) if pos >= 0]
    return text[: min(cuts)] if cuts else text


def _described(value: Any) -> str:
    """A short, safe description of a value a server sent (type and a glimpse)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, float) and not math.isfinite(value):
        return {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[str(value)]
    if isinstance(value, int | float):
        return f"the number {value!r:.40}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Reader:
    """Reads a server's JSON answer field by field, naming the field of any violation."""

    def __init__(self, endpoint: str, route: str) -> None:
        self.endpoint, self.route = endpoint, route

    def invalid(self, where: str, problem: str) -> InvalidAnswer:
        return InvalidAnswer(
            f"the server at {self.endpoint} answered {self.route} with an invalid response: "
            f"{where} {problem}"
        )

    def expect(self, value: Any, where: str, kind: type[T], what: str) -> T:
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self.invalid(where, f"is {_described(value)}; {what} is expected")
        return value

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        return self.expect(value, where, dict, "an object")

    def array(self, value: Any, where: str) -> list[Any]:
        return self.expect(value, where, list, "a list")

    def text(self, value: Any, where: str) -> str:
        return self.expect(value, where, str, "a string")

    def offset(self, value: Any, where: str) -> int:
        number = self.expect(value, where, int, "an integer")
        if number < 0:
            raise self.invalid(where, f"is {number}; a character offset is at least 0")
        return number

    def logprob(self, value: Any, where: str) -> float:
        """A log-probability: a finite number, at most 0 (a hair above is rounding: 0)."""
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.invalid(where, f"is {_described(value)}; a log-probability is expected")
        number = float(value)
        if not math.isfinite(number) or not LOGPROB_FLOOR <= number <= LOGPROB_ROUNDING:
            raise self.invalid(
                where,
                f"is {_described(value)}; a log-probability is a finite number from "
                f"{LOGPROB_FLOOR:g} to 0",
            )
        return min(number, 0.0)

    def first_choice(self, data: Any) -> dict[str, Any]:
        choices = self.array(self.obj(data, "the body").get("choices"), "choices")
        if not choices:
            raise self.invalid("choices", "is empty; one choice is expected")
        return self.obj(choices[0], "choices[0]")


@dataclass(frozen=True)
class PromptLogprobs:
    """A server's echoed log-probabilities of a text, validated and aligned.

    ``values[0]`` may be None (no log-probability for the first token); ``tops`` is empty or
    one entry per token (None where the server gave none).
    """

    tokens: list[str]
    values: list[float | None]
    offsets: list[int]
    tops: list[dict[str, float] | None]


def parse_prompt_logprobs(reader: _Reader, data: Any, text: str) -> PromptLogprobs:
    """Validate ``choices[0].logprobs`` of an ``echo`` completion of ``text`` (max_tokens 1)."""
    choice = reader.first_choice(data)
    where = "choices[0].logprobs"
    raw = choice.get("logprobs")
    if raw is None or (isinstance(raw, dict) and not raw.get("token_logprobs")):
        raise UnsupportedRequest(
            f"the server at {reader.endpoint} does not return prompt log-probabilities "
            "(echo + logprobs on /completions); evaluate this suite on the transformers or "
            "vllm backend"
        )
    logprobs = reader.obj(raw, where)
    tokens = [
        reader.text(t, f"{where}.tokens[{k}]")
        for k, t in enumerate(reader.array(logprobs.get("tokens"), f"{where}.tokens"))
    ]
    raw_values = reader.array(logprobs.get("token_logprobs"), f"{where}.token_logprobs")
    raw_offsets = reader.array(logprobs.get("text_offset"), f"{where}.text_offset")
    for name, entries in (("token_logprobs", raw_values), ("text_offset", raw_offsets)):
        if len(entries) != len(tokens):
            raise reader.invalid(
                f"{where}.{name}",
                f"has {len(entries)} entries for {len(tokens)} tokens; one per token is expected",
            )
    if len(tokens) < 2:
        raise reader.invalid(f"{where}.tokens", f"has {len(tokens)} entries for an echoed text")
    values: list[float | None] = [
        None if k == 0 and v is None else reader.logprob(v, f"{where}.token_logprobs[{k}]")
        for k, v in enumerate(raw_values)
    ]
    offsets = [reader.offset(o, f"{where}.text_offset[{k}]") for k, o in enumerate(raw_offsets)]
    for k in range(1, len(offsets)):
        if offsets[k] < offsets[k - 1]:
            raise reader.invalid(
                f"{where}.text_offset[{k}]",
                f"is {offsets[k]}, before the previous token's {offsets[k - 1]}; offsets "
                "never decrease",
            )
    if offsets[0] != 0:
        raise reader.invalid(f"{where}.text_offset[0]", f"is {offsets[0]}; the echo starts at 0")
    beyond = sum(1 for o in offsets if o >= len(text))
    if beyond > 1:  # max_tokens is 1: one generated token at most lies past the text
        raise reader.invalid(
            f"{where}.text_offset",
            f"places {beyond} tokens at or past the end of the {len(text)}-character text; "
            "one generated token at most is expected",
        )
    tops: list[dict[str, float] | None] = []
    raw_tops = logprobs.get("top_logprobs")
    if raw_tops is not None:
        raw_tops = reader.array(raw_tops, f"{where}.top_logprobs")
        if len(raw_tops) != len(tokens):
            raise reader.invalid(
                f"{where}.top_logprobs",
                f"has {len(raw_tops)} entries for {len(tokens)} tokens; one per token is expected",
            )
        for k, top in enumerate(raw_tops):
            if top is None:
                tops.append(None)
                continue
            entry = reader.obj(top, f"{where}.top_logprobs[{k}]")
            tops.append(
                {
                    str(token): reader.logprob(value, f"{where}.top_logprobs[{k}][{token!r:.40}]")
                    for token, value in entry.items()
                }
            )
    return PromptLogprobs(tokens, values, offsets, tops)


class OpenAIBackend(Backend):
    """Greedy completions, chat completions and echoed log-probabilities over HTTP."""

    name = "openai"

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        timeout: float = ENDPOINT_TIMEOUT_SECONDS,
        max_response_bytes: int = ENDPOINT_MAX_RESPONSE_BYTES,
        concurrency: int = DEFAULT_CONCURRENCY,
        server: str = "",
        check_stop: Callable[[], None] | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.concurrency = max(1, concurrency)
        self.server = server
        # Raises to stop (the job's JobContext.check_stop): asked several times a second.
        self.check_stop = check_stop or (lambda: None)

    def close(self) -> None:
        """Nothing to close: each call opens and closes its own connections."""

    # ------------------------------------------------------------------ HTTP

    async def _request(
        self, client: httpx.AsyncClient, method: str, route: str, body: Any = None
    ) -> Any:
        """One request: the whole exchange within the deadline, the body within the cap."""
        url = f"{self.endpoint}{route}"
        reader = _Reader(self.endpoint, route)
        try:
            async with asyncio.timeout(self.timeout):
                raw, status = await self._read(client, method, url, body, reader)
        except TimeoutError:
            raise InvalidAnswer(
                f"the server at {self.endpoint} did not finish answering {route} within "
                f"{self.timeout:g} s (the operator sets {TIMEOUT_SETTING})"
            ) from None
        except httpx.HTTPError as exc:
            raise EndpointError(f"{url}: {type(exc).__name__}: {exc}") from None
        if not 200 <= status < 300:
            text = raw[:300].decode("utf-8", "replace")
            raise EndpointError(f"{url} answered {status}: {text}")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise reader.invalid("the body", "is not JSON") from None

    async def _read(
        self, client: httpx.AsyncClient, method: str, url: str, body: Any, reader: _Reader
    ) -> tuple[bytes, int]:
        cap = self.max_response_bytes
        too_large = reader.invalid(
            "the body", f"is larger than {cap} bytes (the operator sets {MAX_RESPONSE_SETTING})"
        )
        # identity: a compressed answer could expand far beyond what was counted on the wire.
        headers = {"Accept-Encoding": "identity"}
        async with client.stream(method, url, json=body, headers=headers) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise too_large
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > cap:
                    raise too_large
                chunks.append(chunk)
            return b"".join(chunks), response.status_code

    def _run(
        self,
        count: int,
        call: Callable[[httpx.AsyncClient, int], Awaitable[T]],
        done: Callable[[int, T], None],
    ) -> None:
        """``call(client, i)`` for every index, ``concurrency`` at a time; ``done(i, result)``
        in this thread as each finishes; ``check_stop`` between (it raises to stop)."""
        if count:
            asyncio.run(self._gather(count, call, done))

    async def _gather(
        self,
        count: int,
        call: Callable[[httpx.AsyncClient, int], Awaitable[T]],
        done: Callable[[int, T], None],
    ) -> None:
        limits = httpx.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency
        )
        # The deadline per request is ours (asyncio.timeout); httpx's own only bounds connects.
        timeout = httpx.Timeout(None, connect=min(self.timeout, 30.0))
        finished: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
        indices: Iterator[int] = iter(range(count))
        async with httpx.AsyncClient(
            timeout=timeout, limits=limits, follow_redirects=False
        ) as client:

            async def worker() -> None:
                for index in indices:
                    try:
                        finished.put_nowait((index, await call(client, index), None))
                    except Exception as exc:  # handed to the loop below, which raises it
                        finished.put_nowait((index, None, exc))
                        return

            workers = [asyncio.create_task(worker()) for _ in range(min(self.concurrency, count))]
            try:
                received = 0
                while received < count:
                    self.check_stop()
                    try:
                        index, value, error = await asyncio.wait_for(
                            finished.get(), STOP_POLL_SECONDS
                        )
                    except TimeoutError:
                        continue
                    if error is not None:
                        raise error
                    done(index, value)
                    received += 1
            finally:
                # Requests still in flight are abandoned at once: their connections close.
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    def request_json(self, method: str, route: str) -> Any:
        """One request outside a batch (``/models``), with the same deadline, cap and stop."""
        answers: list[Any] = []
        self._run(
            1,
            lambda client, _i: self._request(client, method, route),
            lambda _i, value: answers.append(value),
        )
        return answers[0]

    # ------------------------------------------------------------------ Backend

    def info(self) -> EngineInfo:
        return EngineInfo(
            backend=self.name,
            device=self.endpoint,
            dtype="unknown",
            version=f"openai-compatible server{f' ({self.server})' if self.server else ''}",
        )

    async def _complete(
        self, client: httpx.AsyncClient, prompt: Prompt, max_new_tokens: int, stop: Sequence[str]
    ) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_new_tokens,
            "temperature": 0,
        }
        if stop:
            body["stop"] = list(stop)
        if prompt.chat:
            route = "/chat/completions"
            body["messages"] = [{"role": "user", "content": prompt.text}]
        else:
            route = "/completions"
            body["prompt"] = prompt.text
        data = await self._request(client, "POST", route, body)
        reader = _Reader(self.endpoint, route)
        choice = reader.first_choice(data)
        if prompt.chat:
            message = reader.obj(choice.get("message"), "choices[0].message")
            text = reader.text(message.get("content"), "choices[0].message.content")
        else:
            text = reader.text(choice.get("text"), "choices[0].text")
        return _cut_at_stop(text, stop)

    def complete(self, prompt: Prompt, *, max_new_tokens: int, stop: Sequence[str]) -> str:
        """One greedy continuation of ``prompt``."""
        return self.generate([prompt], max_new_tokens=max_new_tokens, stop=stop)[0]

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        on_result: Callable[[int, str], None] | None = None,
    ) -> list[str]:
        results: list[str] = [""] * len(prompts)

        def done(index: int, text: str) -> None:
            results[index] = text
            if on_result is not None:
                on_result(index, text)

        self._run(
            len(prompts),
            lambda client, i: self._complete(client, prompts[i], max_new_tokens, stop),
            done,
        )
        return results

    async def _echo(self, client: httpx.AsyncClient, text: str) -> PromptLogprobs:
        """The server's log-probabilities of every token of ``text`` (``echo`` + ``logprobs``)."""
        body = {
            "model": self.model,
            "prompt": text,
            "max_tokens": 1,
            "temperature": 0,
            "echo": True,
            "logprobs": 1,
        }
        try:
            data = await self._request(client, "POST", "/completions", body)
        except InvalidAnswer:
            raise
        except EndpointError as exc:
            raise UnsupportedRequest(
                f"the server at {self.endpoint} refused a request for prompt log-probabilities "
                f"(echo + logprobs): {exc}"
            ) from None
        return parse_prompt_logprobs(_Reader(self.endpoint, "/completions"), data, text)

    def loglikelihood(self, requests: Sequence[tuple[Prompt, str]]) -> list[tuple[float, bool]]:
        for prompt, _ in requests:
            if prompt.chat:
                raise UnsupportedRequest(
                    "log-likelihoods of a chat prompt cannot be read from an OpenAI-compatible "
                    'server (chat completions have no echo); use "prompt_format": "plain"'
                )
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)

        async def score(client: httpx.AsyncClient, index: int) -> tuple[float, bool]:
            prompt, continuation = requests[index]
            full = prompt.text + continuation
            # The context's trailing whitespace is scored with the continuation, as the peers
            # split a pair (``transformers_backend.encode_pair``).
            context = prompt.text.rstrip()
            echoed = await self._echo(client, full)
            total, greedy = 0.0, True
            for k, (value, offset) in enumerate(zip(echoed.values, echoed.offsets, strict=True)):
                # The echoed prompt's tokens, then one generated token (offset past the end).
                if offset < len(context) or offset >= len(full) or value is None:
                    continue
                total += value
                top = echoed.tops[k] if k < len(echoed.tops) else None
                # Greedy: no token was more likely than the one in the text.
                if top and max(top.values()) > value + 1e-6:
                    greedy = False
            return total, greedy

        def done(index: int, value: tuple[float, bool]) -> None:
            results[index] = value

        self._run(len(requests), score, done)
        return results

    def token_nll(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        results: list[tuple[float, int]] = [(0.0, 0)] * len(texts)

        async def score(client: httpx.AsyncClient, index: int) -> tuple[float, int]:
            text = texts[index]
            echoed = await self._echo(client, text)
            total, count = 0.0, 0
            for value, offset in zip(echoed.values, echoed.offsets, strict=True):
                if value is None or offset >= len(text):  # first token; the generated one
                    continue
                total -= value
                count += 1
            return total, count

        def done(index: int, value: tuple[float, int]) -> None:
            results[index] = value

        self._run(len(texts), score, done)
        return results


def served_model(backend: OpenAIBackend) -> dict[str, Any]:
    """The server's ``/models`` entry for the backend's model (the fields that describe it)."""
    url = f"{backend.endpoint}/models"
    try:
        data = backend.request_json("GET", "/models")
    except InvalidAnswer:
        raise
    except EndpointError as exc:
        raise EndpointError(f"cannot list the models served at {url}: {exc}") from None
    reader = _Reader(backend.endpoint, "/models")
    entries = reader.array(reader.obj(data, "the body").get("data"), "data")
    for k, entry in enumerate(entries):
        entry = reader.obj(entry, f"data[{k}]")
        if entry.get("id") == backend.model:
            # Only short scalars: what is hashed and recorded must not be the server's to inflate.
            return {
                name: entry[name]
                for name in MODEL_FIELDS
                if isinstance(entry.get(name), str | int) and len(str(entry[name])) <= 1000
            }
    served = [str(e.get("id"))[:100] for e in entries[:20] if isinstance(e, dict)]
    raise EndpointError(
        f"the server at {backend.endpoint} does not serve {backend.model!r}; it serves {served}"
    )


def served_fingerprint(backend: OpenAIBackend, chat: bool) -> tuple[str, dict[str, Any]]:
    """``sha256:…`` of the server's description of the model plus its greedy probe answers."""
    entry = served_model(backend)
    backend.server = str(entry.get("owned_by") or "")[:100]
    probe = backend.generate(
        [Prompt(text, chat) for text in PROBE_PROMPTS], max_new_tokens=PROBE_TOKENS
    )
    content = {"endpoint": backend.endpoint, "model": entry, "probe": probe}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return f"sha256:{digest}", entry
