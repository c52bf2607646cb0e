"""RFC 9457 problem details: every error response is ``application/problem+json``."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("forgetguard.api")


class Problem(Exception):
    """An error the client can act on; rendered as problem+json by the app."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers
        self.extra = extra


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """Build a problem+json response."""
    body: dict[str, Any] = {
        "type": f"https://forgetguard.dev/problems/{status}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


# Suite kinds validate without a union tag (``app.suites.registry.validate_suite``); only a suite
# entry's "ref" / "inline" branch is left in a location.
_TAGS = ("ref", "inline")


def _clean_loc(loc: tuple[Any, ...] | list[Any]) -> list[Any]:
    # Discriminated unions insert the tag ("ref", "inline") into the location; drop it so the
    # location reads like the JSON path the client sent.
    return [part for part in loc if part not in _TAGS]


_UNSET = object()


def _short(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def describe_loc(loc: tuple[Any, ...] | list[Any], body: Any = _UNSET) -> tuple[str, str | None]:
    """A location as the client would write it, and the id of the innermost item it passes.

    ``("body", "items", 3, "check")`` over the request body becomes
    ``("items[3] (id 'geo-004').check", "geo-004")``: the index alone does not tell a person
    which of 10,000 items to fix, the id does.
    """
    parts = list(loc)
    if not parts:
        return "request", None
    source, rest = parts[0], parts[1:]
    if source in ("query", "path", "header", "cookie"):
        name = ".".join(str(p) for p in _clean_loc(rest))
        return f"{source} parameter {name!r}", None
    if source != "body":
        rest = parts
    node: Any = body
    text = ""
    item_id: str | None = None
    for part in rest:
        if isinstance(part, int):
            text += f"[{part}]"
            if isinstance(node, list) and 0 <= part < len(node):
                node = node[part]
                if isinstance(node, dict) and isinstance(node.get("id"), str):
                    item_id = node["id"]
                    text += f" (id {_short(item_id)!r})"
            else:
                node = _UNSET
            continue
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif part in _TAGS or (isinstance(part, str) and part.startswith(("function-", "tagged-"))):
            continue  # a union branch, not a key the client wrote
        else:
            node = _UNSET
        text += f".{part}" if text else str(part)
    return text or "request body", item_id


def validation_errors(raw: list[Any], body: Any = _UNSET) -> list[dict[str, Any]]:
    """Pydantic errors as ``{"loc", "msg", "type"}`` (plus ``item_id`` inside a suite item)."""
    out = []
    for err in raw:
        msg = str(err.get("msg", "invalid value"))
        msg = msg.removeprefix("Value error, ")
        entry: dict[str, Any] = {
            "loc": _clean_loc(err.get("loc", ())),
            "msg": msg,
            "type": err.get("type"),
        }
        _where, item_id = describe_loc(err.get("loc", ()), body)
        if item_id is not None:
            entry["item_id"] = item_id
        out.append(entry)
    return out


def _validation_detail(err: dict[str, Any], body: Any) -> str:
    """One error as a sentence: ``items[3] (id 'geo-004'): unknown check type 'foo'``."""
    loc = list(err.get("loc", ()))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "JSON decode error")
        at = f" (at character {loc[1]})" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return f"request body is not valid JSON: {reason}{at}"
    # Check validators already prefix their own path ("check: …", "check.all[1]: …").
    last = loc[-1] if loc else None
    if isinstance(last, str) and msg.startswith((f"{last}:", f"{last}.", f"{last}[")):
        loc = loc[:-1]
    where, _ = describe_loc(loc, body)
    return f"{where}: {msg}"


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json."""

    @app.exception_handler(Problem)
    async def _problem(_request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status, exc.title, exc.detail, errors=exc.errors, headers=exc.headers, **exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        raw = list(exc.errors())
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        json_sent = media == "application/json" or media.endswith("+json")
        if not json_sent and any(list(err.get("loc", ()))[:1] == ["body"] for err in raw):
            # FastAPI parses a body as JSON only when it says it is JSON; anything else reaches
            # validation as raw bytes, and "should be a valid dictionary" hides the real cause.
            got = f"content-type {media!r}" if media else "no content-type"
            return problem_response(
                415,
                "Unsupported Media Type",
                f"send the request body as JSON with 'content-type: application/json' (got {got})",
            )
        body = exc.body if exc.body is not None else _UNSET
        errors = validation_errors(raw, body)
        first = _validation_detail(raw[0], body) if raw else "invalid request"
        return problem_response(
            422,
            "Validation failed",
            first + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = getattr(exc, "title", None) or (
            HTTPStatus(exc.status_code).phrase
            if exc.status_code in HTTPStatus._value2member_map_
            else "Error"
        )
        detail = exc.detail if isinstance(exc.detail, str) else title
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such resource; see GET /docs for the API"
        if exc.status_code == 405:
            detail = "method not allowed on this resource"
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            # FastAPI's words for a body it could not decode (not UTF-8, say).
            detail = "the request body could not be parsed: send UTF-8 encoded JSON"
        return problem_response(
            exc.status_code, title, detail, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # Never leak a stack trace or an internal path: log it, answer generically.
        log.exception("unhandled error")
        return problem_response(
            500, "Internal Server Error", "an unexpected error occurred; it was logged"
        )


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details; every error response has this shape.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "description": "field-level validation errors",
            "items": {
                "type": "object",
                "required": ["loc", "msg"],
                "properties": {
                    "loc": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    },
                    "msg": {"type": "string"},
                    "type": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "item_id": {"type": "string"},
                },
            },
        },
    },
    "additionalProperties": True,
}
_PROBLEM_CONTENT = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def _problem_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": _PROBLEM_CONTENT}


def document_problems(app: FastAPI, *, auth: bool) -> None:
    """Make the OpenAPI schema say what errors really look like, for every operation.

    FastAPI documents 422 as its own ``HTTPValidationError`` JSON; this API answers every error
    as problem+json. Each operation gets that 422, a problem+json ``default`` (404, 409, 413, …),
    401/403 and a bearer security scheme when API keys are on, and 413 where it takes a body.
    Done once over the generated schema, so routers added later are covered too.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
        if auth:
            components.setdefault("securitySchemes", {})["bearer"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "An API key from FORGETGUARD_API_KEYS; read keys may only GET.",
            }
            schema["security"] = [{"bearer": []}]
        for path, item in schema.get("paths", {}).items():
            for method in _METHODS:
                operation = item.get(method)
                if operation is None:
                    continue
                responses = operation.setdefault("responses", {})
                responses["422"] = _problem_response("Validation failed (problem+json)")
                responses.setdefault("default", _problem_response("Error (problem+json)"))
                if "requestBody" in operation:
                    responses.setdefault("413", _problem_response("Request body too large"))
                    responses.setdefault(
                        "415", _problem_response("Body not sent as application/json")
                    )
                if auth and path != "/healthz":
                    responses.setdefault("401", _problem_response("Missing or invalid API key"))
                    responses.setdefault("403", _problem_response("API key lacks write scope"))
                if auth and path == "/healthz":
                    operation["security"] = []
        # FastAPI's own validation-error schemas are unused now; drop them unless referenced.
        schemas = components.get("schemas", {})
        fastapi_own = ("HTTPValidationError", "ValidationError")
        text = json.dumps(
            [schema.get("paths", {}), {k: v for k, v in schemas.items() if k not in fastapi_own}]
        )
        if not any(f"#/components/schemas/{name}" in text for name in fastapi_own):
            for name in fastapi_own:
                schemas.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
