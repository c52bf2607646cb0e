"""The fuzz run (``test_fuzz.py``): an operation whose requests schemathesis itself cannot
generate is skipped, saying why, instead of failing the run.

schemathesis 4.x sometimes raises ``InvalidSchema: Cannot generate an array with 1 demanded
elements`` while it builds a mutated (negative) body for ``POST /evaluations``. Whether it does
changed with what else the process had imported (a whole-suite run failed, the same file alone
passed, with the same OpenAPI document and seed): a generator limit, not a response of the API.
Every check on every response still fails the run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    try:
        return (yield)
    except Exception as exc:
        if type(exc).__name__ == "InvalidSchema" and str(exc).startswith("Cannot generate"):
            pytest.skip(f"schemathesis could not generate this operation's requests: {exc}")
        raise
