"""The HTTP vocabulary of the config service API: typed errors, the request's caller, bodies, ETags, long-polls.

Every handler replies or raises ``ApiError(status, code, message)``; ``api.py`` renders it as
``{"error": code, "message": ...}`` (plus ``errors`` for 400/422 lists). Nothing here knows a route.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from aiohttp import web

from gateway.config.compile import SERVICE_NAME
from gateway.config.errors import Problem
from gateway.config.values import parse_duration
from gateway.configservice.auth import Access, Token, TokenSet
from gateway.configservice.store import ConfigStore
from telemetry.metrics import ConfigServiceMetrics

__all__ = [
    "MAX_WAIT",
    "CALLER",
    "STATE",
    "ApiError",
    "ApiState",
    "authorize",
    "etag",
    "iso",
    "json_body",
    "json_response",
    "long_poll",
    "matches",
    "path_name",
    "read_body",
    "wait_seconds",
]

MAX_WAIT: Final = 60.0  # a long-poll never outlives common proxy and load-balancer idle timeouts (60 s and up)
_SERVICE: Final = SERVICE_NAME  # services are named as in the gateway config
_NAME: Final = re.compile(r"[A-Za-z0-9._-]+")  # bundle names, instance ids
_MAX_NAME: Final = 128

T = TypeVar("T")


class ApiError(Exception):
    """A reply the API makes instead of the normal answer: status, a stable code, a message, maybe a problem list."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        problems: Sequence[Problem] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.problems = tuple(problems)
        self.headers = headers or {}


@dataclass(slots=True)
class ApiState:
    """The handles the handlers share (one per app): the store, the tokens, metrics, the clock."""

    store: ConfigStore
    tokens: TokenSet
    metrics: ConfigServiceMetrics
    clock: Callable[[], float] = time.time
    # The mesh's trust domain: pushed clusters' `mesh_identity` is checked against it, as the gateways will.
    trust_domain: str = "meshgate.local"
    # Long-polls parked right now: their timeouts are moved to "now" when the service stops, so they answer 304 at
    # once instead of holding the shutdown for up to MAX_WAIT.
    parked: set[asyncio.Timeout] = field(default_factory=set)
    stopping: bool = False
    # The encoded GET answer of each service's latest version, as (version, ETag, body): a push wakes every watcher
    # with the same bytes. Checked by ETag, not number alone: a restored store may reuse a number for other content.
    bodies: dict[str, tuple[int, str, bytes]] = field(default_factory=dict)

    def stop_polls(self) -> None:
        self.stopping = True
        now = asyncio.get_running_loop().time()
        for timeout in self.parked:
            timeout.reschedule(now)


STATE: Final = web.AppKey("configservice_state", ApiState)
# The caller's token name, for the request's log line.
CALLER: Final = web.RequestKey("configservice_caller", str)


def authorize(request: web.Request, access: Access, service: str | None) -> Token:
    """The caller's token if it may make this call; ``ApiError`` 401 (no or unknown token) or 403 (not allowed)."""
    state = request.app[STATE]
    token = state.tokens.authenticate(request.headers.get("Authorization"))
    if token is None:
        reason = "unknown token" if request.headers.get("Authorization") else "missing bearer token"
        raise ApiError(401, "unauthenticated", reason, headers={"WWW-Authenticate": 'Bearer realm="meshgate"'})
    request[CALLER] = token.name  # for the request's log line: the name, never the token
    refused = token.allows(access, service)
    if refused is not None:
        raise ApiError(403, "forbidden", refused)
    return token


def path_name(request: web.Request, key: str) -> str:
    """A name from the URL, checked: services as the gateway config spells them, other names ``[A-Za-z0-9._-]+``."""
    value = request.match_info[key]
    pattern = _SERVICE if key == "service" else _NAME
    # "." and "..": a bundle name becomes a file name on every gateway (bootstrap.is_bundle_name refuses them there)
    if len(value) > _MAX_NAME or not pattern.fullmatch(value) or value in (".", ".."):
        hint = "lower-case letters, digits, . _ -" if key == "service" else "letters, digits, . _ -"
        raise ApiError(400, "bad_request", f"invalid {key} {value[:_MAX_NAME]!r} in the path (use {hint})")
    return value


async def read_body(request: web.Request, limit: int, what: str) -> bytes:
    """The whole request body, at most ``limit`` bytes (413 beyond, before reading when Content-Length says so)."""
    too_large = ApiError(413, "payload_too_large", f"{what} is larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: web.Request, limit: int = 64 * 1024) -> dict[str, Any]:
    body = await read_body(request, limit, "the request body")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, "bad_request", f"the body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return value


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=encode(body), status=status, headers=headers, content_type="application/json")


def encode(body: object) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def iso(timestamp: float) -> str:
    """Unix seconds -> ISO 8601 UTC with milliseconds, as every time in the API's answers."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp))
    return f"{whole}.{int(timestamp * 1000) % 1000:03d}Z"


def etag(value: int | str) -> str:
    return f'"{value}"'


def matches(request: web.Request, current: str | None) -> bool:
    """Whether ``If-None-Match`` names the current ETag (``*`` matches any existing representation)."""
    header = request.headers.get("If-None-Match")
    if header is None or current is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in tags or current in tags


def wait_seconds(request: web.Request) -> float | None:
    """``?wait=30s`` in seconds (capped at ``MAX_WAIT``), ``None`` without it; 400 for a bad value."""
    text = request.query.get("wait")
    if text is None:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as error:
        raise ApiError(400, "bad_request", f"wait: {error}") from None
    return min(seconds, MAX_WAIT)


async def long_poll(state: ApiState, wait: Callable[[], Awaitable[T | None]]) -> T | None:
    """Run a store wait as a parked watcher: counted in the watchers gauge, cut short (``None``) on shutdown."""
    if state.stopping:
        return None
    timeout = asyncio.timeout(None)
    state.parked.add(timeout)
    state.metrics.watchers.inc()
    try:
        async with timeout:
            return await wait()
    except TimeoutError:
        return None
    finally:
        state.metrics.watchers.dec()
        state.parked.discard(timeout)
