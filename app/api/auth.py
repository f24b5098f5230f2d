"""API keys, roles and the per-key rate limit: who may call what.

Keys are `dtx_` + 32 random bytes (URL-safe base64), sent as `Authorization: Bearer <key>` (what
the `openai` client sends). Only their SHA-256 is stored: a key has 256 bits of entropy, so a
fast hash is enough (no guessing can invert it) and a lookup is one indexed read. A key is shown
once, when it is created.

Roles are ordered: `reader` (generate, read jobs, versions, corpora) < `editor` (+ submit and
cancel jobs, retire versions, upload and delete corpora) < `admin` (+ manage keys). A route
declares its role with `dependencies=[Depends(require("editor"))]` (or takes the `Principal`);
`annotate_roles` copies the roles into the OpenAPI spec as `x-required-role`.

`DETOX_ADMIN_KEY`, when set, is a bootstrap admin key accepted besides the stored ones (compared in
constant time, never stored). With `DETOX_AUTH=false` every caller is an anonymous admin (the
server then refuses to listen on anything but a loopback address).

A checked key is trusted for `auth_cache_s` seconds without a database read; when the database
is unreachable, keys seen before stay trusted (a revocation needs the database too), so
generation survives a database outage.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.api.errors import ApiError
from app.store import crud
from app.store.models import ROLES, ApiKey

log = logging.getLogger(__name__)

KEY_PREFIX = "dtx_"
SHOWN_PREFIX = 12  # characters of a key kept for listings ("dtx_" + 8)
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
RATE_LIMIT = "rate_limit_error"
_RANK = {role: rank for rank, role in enumerate(ROLES)}
_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer dtx_...`")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a stored key (`key_id`), the bootstrap key or, without auth, anyone."""

    key_id: int | None
    name: str
    role: str

    def allows(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]

    @property
    def limit_key(self) -> str:
        """The rate-limit bucket of this caller."""
        return f"key:{self.key_id}" if self.key_id is not None else f"name:{self.name}"


BOOTSTRAP = Principal(None, "bootstrap", "admin")
ANONYMOUS = Principal(None, "anonymous", "admin")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def issue_key(*, session: Session, name: str, role: str) -> tuple[ApiKey, str]:
    """A new key stored (as its hash) under `name` with `role`: (its row, the key itself)."""
    key = new_key()
    row = crud.create_api_key(
        session=session, name=name, key_hash=hash_key(key), role=role, prefix=key[:SHOWN_PREFIX]
    )
    return row, key


class KeyCache:
    """Key hash -> (principal or None for "no such key", when it was checked)."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[Principal | None, float]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str, *, stale: bool = False) -> tuple[bool, Principal | None]:
        """(found, principal); `stale` accepts an expired entry too."""
        with self._lock:
            entry = self._entries.get(key_hash)
        if entry is None or (not stale and time.monotonic() - entry[1] > self.ttl_s):
            return False, None
        return True, entry[0]

    def put(self, key_hash: str, principal: Principal | None) -> None:
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[key_hash] = (principal, time.monotonic())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _lookup(request: Request, key: str) -> Principal | None:
    state = request.app.state
    key_hash = hash_key(key)
    found, principal = state.key_cache.get(key_hash)
    if found:
        return principal
    try:
        with state.sessionmaker() as session:
            row = crud.get_api_key(session=session, key_hash=key_hash)
    except SQLAlchemyError:
        found, principal = state.key_cache.get(key_hash, stale=True)
        if found and principal is not None:
            return principal  # the database is away: a key it accepted before still holds
        raise
    principal = Principal(row.id, row.name, row.role) if row is not None else None
    state.key_cache.put(key_hash, principal)
    return principal


def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    settings = request.app.state.settings
    if not settings.auth:
        return ANONYMOUS
    if credentials is None or not credentials.credentials:
        header = request.headers.get("authorization")
        if header is not None and header.strip():  # sent, but not as `Bearer <key>`
            scheme = header.split(None, 1)[0]
            how = (
                "no key after `Bearer`" if scheme.lower() == "bearer"
                else f"the scheme is {scheme[:20]!r}" if " " in header.strip()
                else "no scheme"
            )  # fmt: skip
            raise ApiError(
                401,
                f"malformed Authorization header ({how}): send `Authorization: Bearer <key>`",
                type=AUTHENTICATION,
                code="malformed_authorization",
            )
        raise ApiError(
            401,
            "missing API key: send `Authorization: Bearer <key>`",
            type=AUTHENTICATION,
            code="missing_api_key",
        )
    key = credentials.credentials
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
    if admin_key and hmac.compare_digest(key.encode(), admin_key.encode()):
        return BOOTSTRAP
    principal = _lookup(request, key)
    if principal is None:
        raise ApiError(
            401, "invalid or revoked API key", type=AUTHENTICATION, code="invalid_api_key"
        )
    return principal


def require(role: str) -> Callable[..., Principal]:
    """The dependency of a route that needs `role`: authenticates, checks the role, counts the
    request against the caller's rate limit; returns the caller."""
    if role not in _RANK:
        raise ValueError(f"unknown role {role!r}")
    return _REQUIREMENTS[role]


def _requirement(role: str) -> Callable[..., Principal]:
    def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> Principal:
        principal = authenticate(request, credentials)
        if not principal.allows(role):
            raise ApiError(
                403,
                f"this needs the {role!r} role; the key {principal.name!r} is {principal.role!r}",
                type=PERMISSION,
                code="insufficient_role",
            )
        wait = request.app.state.rate_limiter.acquire(principal.limit_key)
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            raise ApiError(
                429,
                f"rate limit exceeded for {principal.name!r}: retry in {retry_after} s",
                type=RATE_LIMIT,
                code="rate_limited",
                headers={"Retry-After": str(retry_after)},
            )
        request.state.principal = principal
        return principal

    dependency.required_role = role  # type: ignore[attr-defined]
    dependency.__name__ = f"require_{role}"
    return dependency


_REQUIREMENTS = {role: _requirement(role) for role in ROLES}
ReaderDep = Annotated[Principal, Depends(require("reader"))]
EditorDep = Annotated[Principal, Depends(require("editor"))]
AdminDep = Annotated[Principal, Depends(require("admin"))]
Reader = Depends(require("reader"))
Editor = Depends(require("editor"))


def _role_of(dependencies: Iterable[Any]) -> str | None:
    """The role among dependencies (`Depends(...)` markers or dependants), searched deeply."""
    pending = list(dependencies)
    while pending:
        item = pending.pop()
        call = getattr(item, "dependency", None) or getattr(item, "call", None)
        role = getattr(call, "required_role", None)
        if role is not None:
            return role
        pending.extend(getattr(item, "dependencies", ()))
    return None


def annotate_roles(routers: Iterable[APIRouter]) -> None:
    """Copy each route's role (its own, else its router's) into the OpenAPI spec as
    `x-required-role`, before the routers are included."""
    for router in routers:
        router_role = _role_of(router.dependencies)
        for route in router.routes:
            if not isinstance(route, APIRoute):
                continue
            role = _role_of(route.dependant.dependencies) or router_role
            if role is not None:
                route.openapi_extra = {**(route.openapi_extra or {}), "x-required-role": role}
