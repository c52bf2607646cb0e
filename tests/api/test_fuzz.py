"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis).

In-process over ASGI (no network, no server), a fresh SQLite database, a fixed seed and a
bounded number of examples per operation, so CI runs it in a few minutes on two cores. It
sends both schema-valid and schema-violating requests to every operation and requires:

- no 5xx, ever (``not_a_server_error``);
- every response matches the schema: status documented, content type documented, body valid
  against the documented schema (``status_code_conformance``, ``content_type_conformance``,
  ``response_schema_conformance``, ``response_headers_conformance``);
- schema-violating requests are refused with a 4xx (``negative_data_rejection``);
- wrong methods get 405 (``unsupported_method``).

Left out, with reasons:

- ``positive_data_acceptance``: a schema-valid body may still be refused, correctly: a model
  path must name a directory under ``FORGETGUARD_MODEL_ROOTS`` (403/422), a suite name must
  exist (404), ids must exist (404). No JSON Schema can say "a directory that exists".
- stateful checks (``use_after_free``, ``ensure_resource_availability``): need OpenAPI links
  the schema does not declare; the API's resources are covered by the API tests instead.
- ``ignored_auth``: the fuzzed app runs without API keys (auth has its own tests).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import checks as st_checks
from schemathesis.config import SchemathesisConfig

from app.core.config import Settings
from app.core.database import upgrade
from app.main import create_app

pytestmark = pytest.mark.timeout(600)

CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
    st_checks.response_headers_conformance,
    st_checks.negative_data_rejection,
    st_checks.unsupported_method,
]


# Explicit, so a schemathesis.toml lying around cannot change what CI runs. 413 is a correct
# refusal of a schema-violating body (10,001 items of 8 KiB each is past the body limit).
CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 20240501,
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [
                    "400",
                    "401",
                    "403",
                    "404",
                    "405",
                    "406",
                    "409",
                    "413",
                    "415",
                    "422",
                ]
            }
        },
    }
)


def _fuzz_app() -> Any:
    """A fresh app on a fresh, migrated SQLite database in a temporary directory."""
    base = Path(tempfile.mkdtemp(prefix="forgetguard-fuzz-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    url = f"sqlite:///{base / 'fuzz.db'}"
    upgrade(url)
    (base / "models").mkdir()
    return create_app(
        Settings(
            database_url=url,
            model_roots=[base / "models"],
            data_roots=[base / "data"],
            artifacts_dir=base / "artifacts",
            cache_dir=base / "cache",
        )
    )


# Loaded at collection (cheap: an empty SQLite file and the schema): schemathesis' lazy
# ``from_fixture`` loader does not work with pytest 9 (it writes ``node._nodeid``).
schema = schemathesis.openapi.from_asgi("/openapi.json", _fuzz_app(), config=CONFIG)


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # a fixed seed: the same requests on every run
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
)
def test_api_conforms_to_its_schema_and_never_fails(case: Any) -> None:
    case.call_and_validate(checks=CHECKS)


def test_schema_has_operations() -> None:
    # Guard against the fuzz run silently testing nothing.
    assert sum(1 for _ in schema.get_all_operations()) >= 8
