"""A model already served by an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, Ollama).

``plain`` prompts go to ``/completions``, ``chat`` prompts to ``/chat/completions`` (the
server applies the model's chat template), greedy (``temperature: 0``). Log-likelihoods and
token NLL come from ``/completions`` with ``echo`` + ``logprobs``, as lm-evaluation-harness's
``local-completions`` does; a server that does not return prompt log-probabilities raises
:class:`UnsupportedRequest`, and a chat prompt cannot be scored this way at all.

The weights are not here to hash: :func:`served_fingerprint` hashes what the server reports
about the model (``/models``) and its greedy answers to a few fixed prompts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import httpx

from workers.engine.base import Backend, EngineInfo, Prompt, UnsupportedRequest

# Requests in flight at once: servers batch concurrent requests (continuous batching).
DEFAULT_CONCURRENCY = 16
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
    """The server could not be used (unreachable, model not served, unexpected answer)."""


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [pos for pos in (text.find(s) for s in stop) if pos >= 0]
    return text[: min(cuts)] if cuts else text


class OpenAIBackend(Backend):
    """Greedy completions, chat completions and echoed log-probabilities over HTTP."""

    name = "openai"

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        timeout: float = 300.0,
        concurrency: int = DEFAULT_CONCURRENCY,
        server: str = "",
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.model = model
        self.concurrency = max(1, concurrency)
        self.server = server
        self.client = httpx.Client(timeout=timeout, follow_redirects=False)

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()

    # ------------------------------------------------------------------ HTTP

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self.client.post(f"{self.endpoint}{route}", json=body)
        except httpx.HTTPError as exc:
            raise EndpointError(f"{self.endpoint}{route}: {exc}") from None
        if response.status_code >= 400:
            raise EndpointError(
                f"{self.endpoint}{route} answered {response.status_code}: {response.text[:300]}"
            )
        try:
            data: dict[str, Any] = response.json()
        except ValueError:
            raise EndpointError(f"{self.endpoint}{route} did not answer JSON") from None
        return data

    def _map(
        self, call: Callable[[int], Any], count: int, done: Callable[[int, Any], None]
    ) -> None:
        """Run ``call(i)`` for every index, ``concurrency`` at a time; ``done`` in this thread."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(call, i): i for i in range(count)}
            try:
                for future in as_completed(futures):
                    done(futures[future], future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    # ------------------------------------------------------------------ Backend

    def info(self) -> EngineInfo:
        return EngineInfo(
            backend=self.name,
            device=self.endpoint,
            dtype="unknown",
            version=f"openai-compatible server{f' ({self.server})' if self.server else ''}",
        )

    def complete(self, prompt: Prompt, *, max_new_tokens: int, stop: Sequence[str]) -> str:
        """One greedy continuation of ``prompt``."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_new_tokens,
            "temperature": 0,
        }
        if stop:
            body["stop"] = list(stop)
        if prompt.chat:
            body["messages"] = [{"role": "user", "content": prompt.text}]
            data = self._post("/chat/completions", body)
            text = (data.get("choices") or [{}])[0].get("message", {}).get("content")
        else:
            body["prompt"] = prompt.text
            data = self._post("/completions", body)
            text = (data.get("choices") or [{}])[0].get("text")
        if not isinstance(text, str):
            raise EndpointError(
                f"{self.endpoint} answered without a completion text: {data!r:.300}"
            )
        return _cut_at_stop(text, stop)

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

        self._map(
            lambda i: self.complete(prompts[i], max_new_tokens=max_new_tokens, stop=stop),
            len(prompts),
            done,
        )
        return results

    def _echo(self, text: str) -> dict[str, Any]:
        """The server's log-probabilities of every token of ``text`` (``echo`` + ``logprobs``)."""
        try:
            data = self._post(
                "/completions",
                {
                    "model": self.model,
                    "prompt": text,
                    "max_tokens": 1,
                    "temperature": 0,
                    "echo": True,
                    "logprobs": 1,
                },
            )
        except EndpointError as exc:
            raise UnsupportedRequest(
                f"the server at {self.endpoint} refused a request for prompt log-probabilities "
                f"(echo + logprobs): {exc}"
            ) from None
        logprobs = (data.get("choices") or [{}])[0].get("logprobs") or {}
        tokens = logprobs.get("tokens")
        values = logprobs.get("token_logprobs")
        offsets = logprobs.get("text_offset")
        if not tokens or not values or not offsets or len(values) < 2:
            raise UnsupportedRequest(
                f"the server at {self.endpoint} does not return prompt log-probabilities "
                "(echo + logprobs on /completions); evaluate this suite on the transformers or "
                "vllm backend"
            )
        return logprobs

    def loglikelihood(self, requests: Sequence[tuple[Prompt, str]]) -> list[tuple[float, bool]]:
        for prompt, _ in requests:
            if prompt.chat:
                raise UnsupportedRequest(
                    "log-likelihoods of a chat prompt cannot be read from an OpenAI-compatible "
                    'server (chat completions have no echo); use "prompt_format": "plain"'
                )
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)

        def score(index: int) -> tuple[float, bool]:
            prompt, continuation = requests[index]
            context = prompt.text
            full = context + continuation
            logprobs = self._echo(full)
            total, greedy = 0.0, True
            tops = logprobs.get("top_logprobs") or []
            for k, (value, offset) in enumerate(
                zip(logprobs["token_logprobs"], logprobs["text_offset"], strict=False)
            ):
                # The echoed prompt's tokens, then one generated token (offset past the end).
                if offset < len(context) or offset >= len(full) or value is None:
                    continue
                total += float(value)
                top = tops[k] if k < len(tops) and tops[k] else {}
                # Greedy: no token was more likely than the one in the text.
                if top and max(top.values()) > float(value) + 1e-6:
                    greedy = False
            return total, greedy

        def done(index: int, value: tuple[float, bool]) -> None:
            results[index] = value

        self._map(score, len(requests), done)
        return results

    def token_nll(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        results: list[tuple[float, int]] = [(0.0, 0)] * len(texts)

        def score(index: int) -> tuple[float, int]:
            text = texts[index]
            logprobs = self._echo(text)
            total, count = 0.0, 0
            for value, offset in zip(
                logprobs["token_logprobs"], logprobs["text_offset"], strict=False
            ):
                if value is None or offset >= len(text):  # first token; the generated one
                    continue
                total -= float(value)
                count += 1
            return total, count

        def done(index: int, value: tuple[float, int]) -> None:
            results[index] = value

        self._map(score, len(texts), done)
        return results


def served_model(client: httpx.Client, endpoint: str, model: str) -> dict[str, Any]:
    """The server's ``/models`` entry for ``model`` (the fields that describe it)."""
    url = f"{endpoint.rstrip('/')}/models"
    try:
        response = client.get(url)
        response.raise_for_status()
        entries = response.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        raise EndpointError(f"cannot list the models served at {url}: {exc}") from None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("id") == model:
            return {k: entry[k] for k in MODEL_FIELDS if k in entry}
    served = [e.get("id") for e in entries if isinstance(e, dict)]
    raise EndpointError(f"the server at {endpoint} does not serve {model!r}; it serves {served}")


def served_fingerprint(backend: OpenAIBackend, chat: bool) -> tuple[str, dict[str, Any]]:
    """``sha256:…`` of the server's description of the model plus its greedy probe answers."""
    entry = served_model(backend.client, backend.endpoint, backend.model)
    backend.server = str(entry.get("owned_by") or "")
    probe = backend.generate(
        [Prompt(text, chat) for text in PROBE_PROMPTS], max_new_tokens=PROBE_TOKENS
    )
    content = {"endpoint": backend.endpoint, "model": entry, "probe": probe}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return f"sha256:{digest}", entry
