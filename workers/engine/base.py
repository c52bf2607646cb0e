"""The interface every compute backend implements, lm-eval style.

A suite kind says which request type it needs (``generate``, ``loglikelihood`` or
``token_nll``: ``app.suites.registry.RequestType``); the evaluation's driver for that type
(``workers.evaluation.scoring``) calls that method on whatever backend the job runs on.
Requests are text, not token ids: a served model (an OpenAI-compatible endpoint) has no
tokenizer here, and a local backend tokenizes exactly as the lesson's ``pipeline`` would.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.suites.registry import REQUEST_TYPES, RequestType, TokenTopK

__all__ = [
    "REQUEST_TYPES",
    "Backend",
    "BadAnswer",
    "EngineInfo",
    "Prompt",
    "RequestType",
    "TokenTopK",
    "UnsupportedRequest",
]


@dataclass(frozen=True)
class Prompt:
    """What the model is asked: ``text`` as a user turn (``chat``) or verbatim (plain)."""

    text: str
    chat: bool


@dataclass(frozen=True)
class EngineInfo:
    """What an evaluation records about the engine that produced it (comparability)."""

    backend: str
    device: str
    dtype: str
    version: str


class Backend(ABC):
    """A loaded model that can answer the three request types."""

    name: str = ""

    @abstractmethod
    def info(self) -> EngineInfo:
        """Backend, device, dtype and engine version, recorded with every evaluation."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        on_result: Callable[[int, str], None] | None = None,
    ) -> list[str]:
        """Greedy continuations in input order; ``on_result(index, text)`` as each finishes."""

    @abstractmethod
    def loglikelihood(self, requests: Sequence[tuple[Prompt, str]]) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | prompt), continuation is greedy)`` per request."""

    @abstractmethod
    def token_nll(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """``(sum of NLL over predicted tokens, number of predicted tokens)`` per raw text."""

    def token_topk(self, texts: Sequence[str], k: int) -> list[TokenTopK]:
        """Optional: ``token_nll`` plus the top-``k`` next tokens at every predicted position.

        What KL to the base is computed from (``drift.kl_per_token``). A backend without
        access to full next-token distributions leaves this unimplemented; its perplexity rows
        then carry no top-k and comparisons omit KL.
        """
        raise NotImplementedError(f"backend {self.name!r} does not report top-k log-probabilities")


class UnsupportedRequest(Exception):
    """The backend cannot answer this request type (a server without prompt log-probabilities).

    The evaluation fails with this message, naming the suite: retrying will not help.
    """


class BadAnswer(Exception):
    """The engine answered what cannot be scored or stored: a served model's response of the
    wrong shape, a non-finite or impossible log-probability, misaligned lists, an answer larger
    than the cap or slower than the deadline. The message names the field (or the setting).

    The evaluation fails with it at once: another attempt would ask the same server the same
    question, and nothing it said is stored.
    """
