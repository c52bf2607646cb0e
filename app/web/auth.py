"""API keys: who may call the API and what each key allows (SECURITY.md).

``FORGETGUARD_API_KEYS="<key>:write,<key>:read"``. When keys are configured, every request
but ``/healthz`` must carry ``Authorization: Bearer <key>``; ``read`` keys may only GET (and
HEAD), ``write`` keys may also POST and cancel. The check is an ASGI middleware, so it covers
every route, mount and page (``/docs``, ``/openapi.json``, ``/ui``, routers added later, even
unknown paths) without any router opting in.

Browsers cannot attach a bearer header to a page load, so HTTP Basic credentials whose
password is the key (any user name) are accepted too, and a 401 to a browser page load also
offers a Basic challenge: that makes ``/ui`` and ``/docs`` usable with keys set.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.errors import problem_response

READ = "read"
WRITE = "write"
SCOPES = (READ, WRITE)
# Methods a read key may use; everything else (POST, PUT, PATCH, DELETE, …) needs write.
READ_METHODS = frozenset({"GET", "HEAD"})
# Paths open without a key: liveness probes must work before anyone has a key.
PUBLIC_PATHS = frozenset({"/healthz"})
REALM = "forgetguard"
ENV_VAR = "FORGETGUARD_API_KEYS"
# A bearer token is visible ASCII (RFC 6750 token68 and a little more); no spaces, no separators.
_KEY_SYNTAX = re.compile(r"[\x21-\x7e]+")
_SEPARATORS = frozenset(",;")

log = logging.getLogger("forgetguard.auth")


class InvalidApiKeys(ValueError):
    """``FORGETGUARD_API_KEYS`` cannot be parsed; the message never contains a key."""


@dataclass(frozen=True)
class ApiKey:
    """One configured key: its sha256 digest (never the key itself), scope and a log label."""

    digest: bytes = field(repr=False)
    scope: str
    label: str

    def allows(self, method: str) -> bool:
        """Whether this key's scope permits ``method``."""
        return self.scope == WRITE or method.upper() in READ_METHODS


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def parse_api_keys(entries: Iterable[str]) -> tuple[ApiKey, ...]:
    """Parse ``key:scope`` entries; raise ``InvalidApiKeys`` (naming the entry, not the key)."""
    keys: dict[bytes, ApiKey] = {}
    for number, raw in enumerate(entries, start=1):
        entry = raw.strip()
        where = f"{ENV_VAR} entry {number}"
        secret, sep, scope = entry.rpartition(":")
        if not sep or not secret:
            raise InvalidApiKeys(
                f"{where} is not KEY:SCOPE; write it as '<key>:read' or '<key>:write'"
            )
        if scope not in SCOPES:
            raise InvalidApiKeys(
                f"{where} has scope {scope!r}; the scope must be 'read' or 'write'"
            )
        if not _KEY_SYNTAX.fullmatch(secret) or _SEPARATORS & set(secret):
            raise InvalidApiKeys(
                f"{where}: a key may hold only visible ASCII characters, without spaces, "
                "commas or semicolons"
            )
        digest = _digest(secret.encode("ascii"))
        previous = keys.get(digest)
        if previous is not None and previous.scope != scope:
            raise InvalidApiKeys(
                f"{where} repeats the key of {previous.label} with another scope; "
                "give each key one scope"
            )
        keys.setdefault(digest, ApiKey(digest=digest, scope=scope, label=f"entry {number}"))
    return tuple(keys.values())


def match_key(keys: Iterable[ApiKey], presented: bytes) -> ApiKey | None:
    """The key equal to ``presented``, compared in constant time against every key.

    Digests have one length, so neither the comparison nor the loop (which never stops early)
    tells an attacker how much of a key was right, or which key came close.
    """
    digest = _digest(presented)
    found: ApiKey | None = None
    for key in keys:
        if hmac.compare_digest(digest, key.digest):
            found = key
    return found


def credentials(authorization: bytes | None) -> bytes | None:
    """The key in ``Authorization``: ``Bearer <key>``, or Basic with the key as the password."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(b" ")
    value = value.strip()
    if not value:
        return None
    scheme = scheme.lower()
    if scheme == b"bearer":
        return value
    if scheme == b"basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        _user, sep, password = decoded.partition(b":")
        return password if sep and password else None
    return None


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return bytes(value)
    return None


def _is_page_load(scope: Scope) -> bool:
    accept = _header(scope, b"accept") or b""
    return b"text/html" in accept


class ApiKeyAuth:
    """ASGI middleware: 401 without a valid key, 403 when its scope does not allow the method."""

    def __init__(
        self, app: ASGIApp, keys: tuple[ApiKey, ...], public_paths: frozenset[str] = PUBLIC_PATHS
    ) -> None:
        self.app = app
        self.keys = keys
        self.public_paths = public_paths

    def _is_public(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        return path in self.public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._is_public(scope):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET") if scope["type"] == "http" else "GET"
        presented = credentials(_header(scope, b"authorization"))
        key = match_key(self.keys, presented) if presented is not None else None
        if key is not None and key.allows(method):
            scope.setdefault("state", {})["api_key"] = {"label": key.label, "scope": key.scope}
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("?", 0))[0]
        where = f"{method} {scope.get('path', '')}"
        if scope["type"] == "websocket":
            log.warning("refused websocket %s from %s: no valid key with that scope", where, client)
            await send({"type": "websocket.close", "code": 1008})
            return
        if key is None:
            challenge = f'Bearer realm="{REALM}"'
            if presented is None:
                detail = (
                    f"{where} needs an API key: send 'Authorization: Bearer <key>' "
                    f"(keys are set with {ENV_VAR})"
                )
            else:
                challenge += ', error="invalid_token"'
                detail = "the API key is not valid"
            if _is_page_load(scope):
                challenge += f', Basic realm="{REALM}"'
            log.warning(
                "401 for %s from %s (%s)",
                where,
                client,
                "no key" if presented is None else "invalid key",
            )
            response = problem_response(
                401, "Authentication required", detail, headers={"WWW-Authenticate": challenge}
            )
        else:
            log.warning("403 for %s from %s (%s has %s scope)", where, client, key.label, key.scope)
            challenge = f'Bearer realm="{REALM}", error="insufficient_scope", scope="{WRITE}"'
            response = problem_response(
                403,
                "Insufficient scope",
                f"this API key has {key.scope} scope, which may only GET; "
                f"{where} needs a write key",
                headers={"WWW-Authenticate": challenge},
            )
        await response(scope, receive, send)
