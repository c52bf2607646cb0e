"""``Idempotency-Key`` for POST routes: a retried request never creates twice.

The same key and body on the same path return the original resource (200); the same key with
another body is a 422. Keys live in the ``idempotency_keys`` table, keyed by (key, path).

Use in a route (the resource and its key are committed in one transaction)::

    @router.post("", status_code=202)
    def post_thing(body: ThingCreate, session: SessionDep, idem: IdempotencyDep,
                   response: Response) -> ThingPublic:
        thing_id, created = idem.create_once(
            session, lambda: service.create(session=session, body=body).id)
        answer(response, created=created, location=f"/things/{thing_id}")
        return service.public(service.get(session=session, thing_id=thing_id))

``create`` only adds rows to the session (it must not commit) and returns the new resource's
id; ``create_once`` commits, and may call it again after rolling back when SQLite refused a
write because another connection committed first. Without a header it simply creates.
``answer`` sets the Location header and, for a replay, 200 with ``Idempotent-Replayed: true``.
Lower level: ``find(session, key=, path=, body_hash=)`` and ``remember(...)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from app.core.errors import Problem
from app.core.tables import IdempotencyKey

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
CREATE_ATTEMPTS = 3
REPLAY_HEADER = "Idempotent-Replayed"


def answer(response: Response, *, created: bool, location: str) -> None:
    """Headers of a POST answered through ``create_once``: ``Location``, and for a replay (not
    ``created``: the original resource) status 200 with the replay header."""
    if not created:
        response.status_code = 200
        response.headers[REPLAY_HEADER] = "true"
    response.headers["Location"] = location


def body_hash(body: bytes | str | BaseModel | Any) -> str:
    """``sha256:…`` of a request body; JSON is canonicalised (key order, whitespace ignored)."""
    if isinstance(body, BaseModel):
        value: Any = body.model_dump(mode="json")
    elif isinstance(body, bytes | str):
        try:
            value = json.loads(body)
        except ValueError:
            raw = body.encode() if isinstance(body, str) else body
            return "sha256:" + hashlib.sha256(raw).hexdigest()
    else:
        value = body
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def find(session: Session, *, key: str, path: str, body_hash: str) -> str | None:
    """The resource id stored for ``key`` on ``path``, None if unseen; 422 if the body differs."""
    stored = session.execute(
        select(IdempotencyKey).where(IdempotencyKey.key == key, IdempotencyKey.path == path)
    ).scalar_one_or_none()
    if stored is None:
        return None
    if stored.body_hash != body_hash:
        raise Problem(
            422,
            "Idempotency-Key reused",
            f"Idempotency-Key {key!r} was already used on POST {path} with a different body "
            f"(it created {stored.resource_id}); send a new key for a new request",
            resource_id=stored.resource_id,
        )
    return stored.resource_id


def remember(session: Session, *, key: str, path: str, body_hash: str, resource_id: str) -> str:
    """Store key → ``resource_id`` and commit the caller's transaction with it.

    Race-safe: when a concurrent request with the same key committed first (primary-key
    conflict, or SQLite refusing a stale write), this request's work is rolled back and the
    winner's resource id is returned. Callers compare it with their own id.
    """
    session.add(IdempotencyKey(key=key, path=path, body_hash=body_hash, resource_id=resource_id))
    try:
        session.commit()
    except (IntegrityError, OperationalError):
        session.rollback()
        winner = find(session, key=key, path=path, body_hash=body_hash)
        if winner is None:
            raise
        return winner
    return resource_id


@dataclass(frozen=True)
class Idempotency:
    """What one request said about idempotency: its key (if any), path and body hash."""

    key: str | None
    path: str
    body_hash: str

    def existing(self, session: Session) -> str | None:
        """The resource id an earlier request with this key created (None without a key)."""
        if self.key is None:
            return None
        return find(session, key=self.key, path=self.path, body_hash=self.body_hash)

    def remember(self, session: Session, resource_id: str) -> str:
        """Commit the new resource together with its key; returns the id to answer with."""
        if self.key is None:
            session.commit()
            return resource_id
        return remember(
            session, key=self.key, path=self.path, body_hash=self.body_hash, resource_id=resource_id
        )

    def create_once(self, session: Session, create: Callable[[], str]) -> tuple[str, bool]:
        """``(resource_id, created)``: the earlier resource for this key, or ``create()``'s.

        ``create`` adds the resource to ``session`` without committing and returns its id.
        SQLite refuses a write from a transaction whose snapshot went stale (another
        connection, such as a worker's heartbeat, committed since it first read): then the
        work is rolled back and done again under SQLite's write lock taken at BEGIN, so
        concurrent retries line up, and the later ones find the winner's key.
        """
        for attempt in range(CREATE_ATTEMPTS):
            if attempt:
                # BEGIN IMMEDIATE on SQLite (see app.core.database); PostgreSQL ignores the option.
                session.connection(execution_options={"immediate": True})
            if (existing := self.existing(session)) is not None:
                return existing, False
            try:
                resource_id = create()
                winner = self.remember(session, resource_id)
            except OperationalError:
                session.rollback()
                if attempt == CREATE_ATTEMPTS - 1:
                    raise
                continue
            return winner, winner == resource_id
        raise AssertionError("unreachable")  # pragma: no cover


async def idempotency(
    request: Request,
    idempotency_key: Annotated[str | None, Header(alias=HEADER)] = None,
) -> Idempotency:
    """FastAPI dependency: the request's ``Idempotency-Key`` and the hash of its JSON body."""
    if idempotency_key is not None:
        idempotency_key = idempotency_key.strip()
        if not idempotency_key or len(idempotency_key) > MAX_KEY_LENGTH:
            raise Problem(
                422, "Invalid Idempotency-Key", f"{HEADER} must be 1 to {MAX_KEY_LENGTH} characters"
            )
    raw = await request.body() if idempotency_key is not None else b""
    return Idempotency(key=idempotency_key, path=request.url.path, body_hash=body_hash(raw))


IdempotencyDep = Annotated[Idempotency, Depends(idempotency)]
