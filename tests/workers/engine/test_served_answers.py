"""What a served model answers is checked, not trusted (issue 29, parts 3 and 4): against a fake
OpenAI-compatible server on loopback, every lie is an ``InvalidAnswer`` naming the field, a
trickling server meets the overall deadline, an oversized body the size cap, and a stop request
abandons requests in flight at once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fake_openai import MODEL, fake_openai
from workers.engine.base import BadAnswer, Prompt
from workers.engine.openai_backend import (
    InvalidAnswer,
    OpenAIBackend,
    served_fingerprint,
    served_model,
)

REPO = Path(__file__).resolve().parents[3]
TEXT = "The quick brown fox jumps over the lazy dog."
CONTEXT = Prompt("Question: What is the capital of France?\nAnswer:", False)


def test_an_honest_server_is_scored() -> None:
    with fake_openai() as server:
        backend = OpenAIBackend(server.url, MODEL)
        assert backend.generate([CONTEXT], max_new_tokens=5) == [" Paris."]
        assert backend.generate([Prompt("Capital?", True)], max_new_tokens=5) == [" Paris."]
        ((nll, tokens),) = backend.token_nll([TEXT])
        assert tokens == len(TEXT.split()) - 1 and nll == pytest.approx(0.5 * tokens)
        ((loglik, greedy),) = backend.loglikelihood([(CONTEXT, " Paris")])
        assert loglik == pytest.approx(-0.5) and greedy
        fingerprint, entry = served_fingerprint(backend, chat=False)
        assert fingerprint.startswith("sha256:") and entry["id"] == MODEL


# mode -> (the call that meets it, the field its message must name)
LIES = {
    "nan": ("token_nll", "choices[0].logprobs.token_logprobs[1] is NaN"),
    "minus-infinity": ("token_nll", "token_logprobs[1] is -Infinity"),
    "huge-logprob": ("token_nll", "token_logprobs[1] is the number -1e+300"),
    "positive-logprob": ("loglikelihood", "token_logprobs[1] is the number 3.5"),
    "short-offsets": ("token_nll", "text_offset has"),
    "string-logprobs": ("token_nll", "token_logprobs[1] is the string '-0.5'"),
    "nan-top": ("loglikelihood", "top_logprobs[1]['a'] is NaN"),
    "list-body": ("generate", "the body is a list of 1; an object is expected"),
    "choices-object": ("generate", "choices is an object; a list is expected"),
    "text-number": ("generate", "choices[0].text is the number 42"),
    "chat-content-list": ("chat", "choices[0].message.content is a list of 2"),
}


@pytest.mark.parametrize("mode", list(LIES))
def test_each_lie_is_an_invalid_answer_naming_the_field(mode: str) -> None:
    call, field = LIES[mode]
    with fake_openai("text-number" if mode == "chat-content-list" else mode) as server:
        backend = OpenAIBackend(server.url, MODEL)
        started = time.monotonic()
        with pytest.raises(InvalidAnswer) as caught:
            if call == "token_nll":
                backend.token_nll([TEXT, TEXT])
            elif call == "loglikelihood":
                backend.loglikelihood([(CONTEXT, " Paris")])
            elif call == "chat":
                backend.generate([Prompt("Capital?", True)], max_new_tokens=5)
            else:
                backend.generate([CONTEXT], max_new_tokens=5)
        assert time.monotonic() - started < 5
    assert isinstance(caught.value, BadAnswer)  # permanent: the evaluation fails once
    assert field in str(caught.value), str(caught.value)
    assert server.url in str(caught.value)


def test_a_trickling_server_meets_the_overall_deadline() -> None:
    with fake_openai("trickle") as server:
        backend = OpenAIBackend(server.url, MODEL, timeout=2.0)
        started = time.monotonic()
        with pytest.raises(InvalidAnswer) as caught:
            backend.generate([CONTEXT] * 3, max_new_tokens=5)
        took = time.monotonic() - started
    assert took < 5, took
    assert "within 2 s" in str(caught.value)
    assert "FORGETGUARD_ENDPOINT_TIMEOUT_SECONDS" in str(caught.value)


def test_a_body_over_the_cap_is_refused_while_reading() -> None:
    with fake_openai("huge-body") as server:
        backend = OpenAIBackend(server.url, MODEL, max_response_bytes=1 << 20)
        with pytest.raises(InvalidAnswer) as caught:
            backend.generate([CONTEXT], max_new_tokens=5)
    assert "larger than 1048576 bytes" in str(caught.value)
    assert "FORGETGUARD_ENDPOINT_MAX_RESPONSE_BYTES" in str(caught.value)


def test_a_huge_models_answer_does_not_grow_the_worker() -> None:
    """200 MB of /models in a fresh process: refused, and the process stays small."""
    with fake_openai("huge-models") as server:
        code = (
            "import resource\n"
            "from workers.engine.openai_backend import OpenAIBackend, InvalidAnswer, served_model\n"
            f"backend = OpenAIBackend({server.url!r}, 'fake')\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    served_model(backend)\nexcept InvalidAnswer as exc:\n    print(exc)\n"
            "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print((after - before) // 1024)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
        )
    message, grown_mib = out.stdout.strip().splitlines()
    assert "/models" in message and "larger than" in message, out.stdout + out.stderr
    assert int(grown_mib) < 100, grown_mib  # the cap is 16 MiB; the answer was 200 MB


def test_a_stop_request_abandons_requests_in_flight() -> None:
    stop = threading.Event()

    def check_stop() -> None:
        if stop.is_set():
            raise RuntimeError("stopped")

    with fake_openai("trickle") as server:
        backend = OpenAIBackend(server.url, MODEL, timeout=300, check_stop=check_stop)
        threading.Timer(1.0, stop.set).start()
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="stopped"):
            backend.generate([CONTEXT] * 20, max_new_tokens=5)
        took = time.monotonic() - started
    assert took < 3, took


def test_a_server_not_serving_the_model_says_what_it_serves() -> None:
    with fake_openai() as server:
        backend = OpenAIBackend(server.url, "other")
        with pytest.raises(Exception, match="does not serve 'other'"):
            served_model(backend)
