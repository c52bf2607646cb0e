"""Build the FastAPI application (no torch is imported on this side)."""

from __future__ import annotations

import codecs
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import numpy as np
from anyio import to_thread
from fastapi import FastAPI
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import compare, evaluations, finetune_jobs, health, suites, workers
from app.api import metrics as metrics_api
from app.core import errors
from app.core.config import Settings, get_settings
from app.core.database import make_engine, session_factory
from app.core.storable import Unstorable, check_json_body, check_url
from app.suites import versions
from app.ui import routes as ui
from app.web import auth, docs
from app.web.filework import file_work_limiter
from app.web.response_cache import FinishedCache


class SchemaNotReady(RuntimeError):
    """The database has not been migrated."""


# Deeper JSON than this is refused before it is parsed: nothing this API takes nests past a
# dozen levels (checks' combinators included), and deep nesting breaks parsers and serialisers.
JSON_MAX_DEPTH = 64
# Bodies larger than this are checked for unstorable values in a worker thread, off the loop.
_CHECK_INLINE_BYTES = 256 * 1024


class BodyRefused(StarletteHTTPException):
    """A request body broke a limit; raised from ``receive``.

    An ``HTTPException`` because FastAPI passes those through when it reads the body (any other
    exception raised there becomes a generic 400), so the app's handler renders it as a problem.
    """

    def __init__(self, status_code: int, title: str, detail: str) -> None:
        super().__init__(status_code, detail)
        self.title = title


class JsonNesting:
    """Incremental scan of a JSON body for its nesting depth (strings and escapes understood).

    Vectorised with numpy, a slice at a time, so the cost is a few milliseconds per MiB
    whatever the body holds (a byte-at-a-time loop in Python would let a body of 8 MiB of
    quotes hold the event loop for seconds).
    """

    SLICE = 1 << 16  # small slices keep the temporary arrays in cache

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.depth = 0
        self.in_string = False
        self.backslashes = 0  # parity of the backslash run that ended the previous slice

    def feed(self, chunk: bytes) -> bool:
        """Scan the next chunk; True once the body nests deeper than ``max_depth``."""
        view = memoryview(chunk)
        return any(self._scan(view[i : i + self.SLICE]) for i in range(0, len(view), self.SLICE))

    def _scan(self, piece: memoryview) -> bool:
        a = np.frombuffer(piece, dtype=np.uint8)
        index = np.arange(a.size, dtype=np.int32)
        # Index of the last byte at or before each position that is not a backslash (-1: none).
        last_other = np.maximum.accumulate(np.where(a == 0x5C, -1, index))
        # Backslashes right before each byte; a run reaching back to the start continues the
        # previous slice's run. A quote after an odd number of them is escaped.
        before = np.empty(a.size, dtype=np.int32)
        before[0] = self.backslashes
        previous = last_other[:-1]
        before[1:] = np.where(
            previous >= 0, index[:-1] - previous, index[:-1] + 1 + self.backslashes
        )
        quotes = (a == 0x22) & (before % 2 == 0)
        inside = (np.cumsum(quotes) - quotes + self.in_string) % 2 == 1
        opens = ((a == 0x5B) | (a == 0x7B)) & ~inside
        closes = ((a == 0x5D) | (a == 0x7D)) & ~inside
        running = self.depth + np.cumsum(opens.astype(np.int32) - closes)
        self.depth = int(running[-1])
        self.in_string = bool((int(quotes.sum()) + self.in_string) % 2)
        tail = int(last_other[-1])
        self.backslashes = (a.size - 1 - tail if tail >= 0 else a.size + self.backslashes) % 2
        return bool(running.max() > self.max_depth)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return bytes(value)
    return None


def _is_json(content_type: bytes | None) -> bool:
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


class BodyLimit:
    """Refuse what no route should see, before any route runs, for every route.

    - bodies over ``limit`` bytes (413): a declared ``Content-Length`` is refused before
      reading, a chunked body as soon as the running total passes the limit;
    - JSON bodies that are not UTF-8 (400): ``json.loads`` would also accept UTF-16 and UTF-32,
      and then the nesting guard (which reads bytes) and the parser would see different text;
    - JSON nested too deeply (422);
    - values the database cannot store (422, see ``app.core.storable``): NUL, lone
      surrogates, Infinity/NaN, anywhere in a JSON body, the path or a query parameter.
    """

    def __init__(self, app: ASGIApp, limit: int, max_depth: int = JSON_MAX_DEPTH) -> None:
        self.app = app
        self.limit = limit
        self.max_depth = max_depth

    def _too_large(self) -> BodyRefused:
        return BodyRefused(
            413, "Request body too large", f"request bodies are limited to {self.limit} bytes"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = (_header(scope, b"content-length") or b"").strip()
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(self._too_large(), scope, receive, send)
            return
        try:
            check_url(scope.get("path", ""), scope.get("query_string", b""))
        except Unstorable as exc:
            await self._refuse(_unstorable(exc), scope, receive, send)
            return
        is_json = _is_json(_header(scope, b"content-type"))
        nesting = JsonNesting(self.max_depth) if is_json else None
        utf8 = codecs.getincrementaldecoder("utf-8")("strict") if is_json else None
        chunks: list[bytes] = []
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] != "http.request":
                return message
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                raise self._too_large()
            if utf8 is None or nesting is None:
                return message
            try:
                utf8.decode(body, final=not message.get("more_body", False))
            except UnicodeDecodeError:
                raise _not_utf8() from None
            if b"\x00" in body:  # never valid JSON; the tell of UTF-16 and UTF-32
                raise _not_utf8()
            if nesting.feed(body):
                raise BodyRefused(
                    422,
                    "JSON nested too deeply",
                    f"request JSON may nest at most {self.max_depth} levels deep",
                )
            chunks.append(body)
            if not message.get("more_body", False):
                whole = b"".join(chunks)
                chunks.clear()
                try:
                    if len(whole) > _CHECK_INLINE_BYTES:
                        await to_thread.run_sync(check_json_body, whole)
                    else:
                        check_json_body(whole)
                except Unstorable as exc:
                    raise _unstorable(exc) from None
            return message

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking)
        except BodyRefused as exc:
            # Raised past the app (a mount that is not FastAPI, say): answer, unless it already did.
            if started:
                raise
            await self._refuse(exc, scope, receive, send)

    async def _refuse(self, exc: BodyRefused, scope: Scope, receive: Receive, send: Send) -> None:
        response = errors.problem_response(exc.status_code, exc.title, str(exc.detail))
        await response(scope, receive, send)


def _not_utf8() -> BodyRefused:
    return BodyRefused(
        400,
        "Body is not UTF-8",
        "JSON request bodies must be UTF-8 encoded (RFC 8259); UTF-16 and UTF-32 are refused",
    )


def _unstorable(exc: Unstorable) -> BodyRefused:
    return BodyRefused(422, "Value cannot be stored", str(exc))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API: routers, problem+json errors, database, built-in suites registered at start."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The thread pool that runs sync routes; and database slots, one per request that may
        # hold a connection (app.web.deps.get_session), fewer than the pool's connections:
        # under load a request waits for a slot, holding nothing, never for a connection.
        to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        app.state.database_slots = anyio.Semaphore(settings.api_threads)
        # Reading clients' model folders and datasets: a pool of its own (app.web.filework).
        app.state.file_work = file_work_limiter(settings)
        engine = make_engine(settings.database_url, pool_size=settings.api_threads, max_overflow=4)
        with engine.connect() as conn:
            try:
                conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
            except Exception:
                raise SchemaNotReady(
                    "the database schema is missing: run `forgetguard db upgrade` "
                    "(forgetguard serve does it for you)"
                ) from None
        app.state.engine = engine
        app.state.sessionmaker = session_factory(engine)
        with app.state.sessionmaker() as session:
            versions.sync_builtins(session)
            session.commit()
        # What start-up allocated lives as long as the process: keep it out of the cyclic
        # collector's full passes, which otherwise add tens of ms to large responses.
        gc.collect()
        gc.freeze()
        yield
        engine.dispose()

    app = FastAPI(
        title="forgetguard",
        version="0.1.0",
        description="Before/after evaluation of fine-tuned language models, and a CI gate.",
        lifespan=lifespan,
        # Swagger UI from the app's own files (app.web.docs), not a CDN; ReDoc has no offline
        # bundle here, so it is off rather than a blank page.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.finished_evaluations = FinishedCache()
    app.state.comparisons = FinishedCache(size=256)
    errors.install(app)
    for module in (health, suites, evaluations, finetune_jobs, compare, workers):
        app.include_router(module.router)
    app.include_router(metrics_api.router)
    docs.install(app)  # /docs, served offline
    ui.install(app)  # the /ui dashboard pages and their static files
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    # Keep this the last add_middleware call: added last is outermost, so a caller without a
    # valid key gets 401/403 before anything else (body reading included) happens. It is
    # path-agnostic: every router, mount and page, including ones added later, is covered.
    api_keys = auth.parse_api_keys(settings.api_keys)
    if api_keys:
        app.add_middleware(auth.ApiKeyAuth, keys=api_keys)
    errors.document_problems(app, auth=bool(api_keys))
    return app
