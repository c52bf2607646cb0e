"""The rule book as the server computes with it: the client's ``CompareRules`` plus how.

``CompareRules`` (``forgetguard.rules``) holds every rule that decides a verdict, with its one
default. ``CompareOptions`` adds what only the server needs to compute a comparison: the
bootstrap's seed and size, which suites to compare, a noise-floor run, and whether runs on
different engines may be compared. Suite kinds, the comparison and fine-tune jobs read this.
``rules_from_query`` reads the rules from a query string (``GET /compare``'s and the
dashboard's; an empty form field keeps a rule's default), and ``RULE_QUERY_PARAMETERS``
documents them as OpenAPI query parameters. The route reads them itself rather than through
FastAPI's query-parameter models, whose handling of an all-default model differs by version.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

from app.core.errors import Problem
from forgetguard.rules import RULE_NAMES, CategoryRule, CompareRules, Mode

__all__ = [
    "RULE_NAMES",
    "CategoryRule",
    "CompareOptions",
    "CompareRules",
    "Mode",
    "RULE_QUERY_PARAMETERS",
    "rules_from_query",
]


class CompareOptions(CompareRules):
    """The rules of one comparison and how to compute it."""

    seed: int = 0
    n_resamples: int = 10_000
    # Compare only these suites (both runs must have them); None: all, which must match.
    suites: tuple[str, ...] | None = None
    # Id of a second evaluation of the base with another batch composition: its churn is the
    # noise floor the forgotten count is read against.
    noise_floor: str | None = None
    # Compare runs made on different engines (backend, dtype, engine version) anyway; the
    # difference is then a warning in the body instead of a 409.
    allow_backend_mismatch: bool = False

    @classmethod
    def of(cls, rules: CompareRules, **how: object) -> CompareOptions:
        """These rules, computed as ``how`` says (``suites``, ``noise_floor`` …).

        ``rules`` may be anything that extends the rule book (a fine-tune job's ``evaluation``
        block): only the rules are read from it.
        """
        return cls(**{name: getattr(rules, name) for name in CompareRules.model_fields}, **how)


def _query_parameters() -> list[dict[str, object]]:
    """Each rule as an OpenAPI query parameter, its schema and description the rule book's."""
    schema = CompareRules.model_json_schema()
    parameters = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        description = prop.pop("description", "")
        prop.pop("title", None)
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": description,
                "schema": prop,
            }
        )
    return parameters


RULE_QUERY_PARAMETERS = _query_parameters()


def rules_from_query(params: Mapping[str, str]) -> CompareRules:
    """The rules a query string sets (an empty value keeps the default); a 422 for a bad one."""
    given = {name: params[name] for name in CompareRules.model_fields if params.get(name)}
    try:
        return CompareRules.model_validate(given)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        must = str(first["msg"]).removeprefix("Input should be ")
        raise Problem(
            422,
            "Invalid parameter",
            f"{name} must be {must}; got {first['input']!r}",
            errors=[{"loc": ["query", *first["loc"]], "msg": first["msg"]}],
        ) from None
