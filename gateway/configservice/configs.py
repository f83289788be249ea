"""Versioned per-service configs: push (validated, stored as N+1), read and watch, history, rollback.

A push is checked as a gateway would compile it (``validate.py``) and stored only when it passes: 422 lists every
problem and nothing is stored. Content equal to the latest version is not a new version (200 ``unchanged``), so a
deploy pipeline may push on every run. Reads carry ``ETag: "N-<first 12 hex of the content hash>"``
(``config_etag``); with ``If-None-Match`` and ``?wait=`` a read long-polls until a version newer than N lands (state
of the world, never deltas). The plain ``"N"`` of earlier gateways is still accepted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any, Final

import structlog
from aiohttp import web

from gateway.config.document import canonical_hash, load_text
from gateway.config.errors import DOCUMENT, ConfigError, Problem
from gateway.configservice.gateways import record_poll
from gateway.configservice.http import (
    STATE,
    ApiError,
    ApiState,
    authorize,
    encode,
    etag,
    iso,
    json_body,
    json_response,
    long_poll,
    matches,
    path_name,
    read_body,
    wait_seconds,
)
from gateway.configservice.store import ConfigVersion, VersionInfo
from gateway.configservice.validate import check_config, check_config_bundles

__all__ = ["CONFIG_LIMIT", "add_config_routes", "check_push", "config_etag", "store_checked"]

CONFIG_LIMIT: Final = 4 * 1024 * 1024  # far above any real config; a config is compiled, and held, whole

log = structlog.get_logger("meshgate.configservice")


def config_etag(version: int, digest: str) -> str:
    """``"N-<first 12 hex of the content hash>"``. The number alone is not enough: a store wiped or restored from
    an old backup numbers its versions again, and a gateway that holds N from before would be told 304 (nothing new)
    about other content under the same number, forever."""
    return etag(f"{version}-{digest[:12]}")


def add_config_routes(app: web.Application) -> None:
    app.router.add_put("/v1/services/{service}/config", put_config)
    app.router.add_get("/v1/services/{service}/config", get_config)
    app.router.add_get("/v1/services/{service}/versions", get_versions)
    app.router.add_post("/v1/services/{service}/rollback", rollback)


async def put_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    service = path_name(request, "service")
    token = authorize(request, "write", service)
    body = await read_body(request, CONFIG_LIMIT, "the config")
    try:
        document = load_text(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ApiError(400, "bad_request", f"the config is not UTF-8 text (byte {error.start})") from None
    except ConfigError as error:
        raise ApiError(400, "bad_request", "the body is not valid YAML or JSON", problems=error.problems) from None
    return await _store(state, service, document, token.name, rollback_of=None)


async def rollback(request: web.Request) -> web.Response:
    state = request.app[STATE]
    service = path_name(request, "service")
    token = authorize(request, "write", service)
    number = (await json_body(request)).get("version")
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise ApiError(400, "bad_request", 'expected {"version": N} with N >= 1')
    old = await state.store.get_version(service, number)
    if old is None:
        raise ApiError(404, "not_found", f"service {service!r} has no version {number}")
    # Checked again: the compiler (or a bundle it names) may have changed since the version was stored, and a
    # rollback that every gateway refuses would leave the fleet on the version being rolled back.
    return await _store(state, service, old.document, token.name, rollback_of=number)


async def check_push(
    state: ApiState, service: str, document: object, *, pending: Mapping[str, bytes] | None = None
) -> tuple[Mapping[str, Any], list[Problem]]:
    """``document`` in its stored form (canonical JSON) and every problem a push of it has: the gateway's compiler,
    the bundles it names (stored here, or in ``pending``: about to be, and loadable with its cache key). Stored
    only if the list is empty."""
    try:
        # The stored form is what gets checked, hashed and served: YAML-only shapes (integer keys) become what a
        # JSON reader sees.
        document = json.loads(json.dumps(document, allow_nan=False))
    except ValueError as error:
        return {}, [Problem(DOCUMENT, f"not representable as JSON: {error}")]
    checked = check_config(service, document, trust_domain=state.trust_domain)
    problems = list(checked.problems)
    bundles: dict[str, bytes] = {}
    for where, name in checked.bundles:
        if pending and name in pending:
            bundles[name] = pending[name]
        elif (record := await state.store.get_bundle(name)) is not None:
            bundles[name] = record.data
        else:
            problems.append(Problem(where, f"no bundle named {name!r} in the config service (PUT /v1/bundles/{name})"))
    if not problems and checked.snapshot is not None and bundles:
        # Loading a bundle is CPU work (parsing Rego): off the event loop.
        problems = await asyncio.to_thread(check_config_bundles, checked.snapshot, bundles)
    if problems:
        return {}, problems
    assert isinstance(document, Mapping)  # check_config refuses anything else
    return document, []


async def store_checked(
    state: ApiState, service: str, document: Mapping[str, Any], author: str, *, rollback_of: int | None = None
) -> tuple[VersionInfo, bool]:
    """Store a document ``check_push`` passed; ``(version, created)`` (not created: equal to the latest)."""
    info, created = await state.store.put_config(
        service, document, canonical_hash(document), author, rollback_of=rollback_of
    )
    result = "created" if created else "unchanged"
    state.metrics.pushes.labels(service, result).inc()
    state.metrics.latest_version.labels(service).set(info.version)
    event = "config_stored" if created else "config_unchanged"
    log.info(event, service_name=service, version=info.version, author=author, rollback_of=rollback_of)
    return info, created


async def _store(
    state: ApiState, service: str, document: object, author: str, *, rollback_of: int | None
) -> web.Response:
    checked, problems = await check_push(state, service, document)
    if problems:
        return _rejected(state, service, author, problems)
    info, created = await store_checked(state, service, checked, author, rollback_of=rollback_of)
    if not created:
        return json_response({"version": info.version, "unchanged": True})
    body: dict[str, Any] = {"version": info.version}
    if rollback_of is not None:
        body["rollback_of"] = rollback_of
    return json_response(body, status=201, headers={"ETag": config_etag(info.version, info.hash)})


def _rejected(state: ApiState, service: str, author: str, problems: list[Problem]) -> web.Response:
    state.metrics.pushes.labels(service, "rejected").inc()
    log.info("config_rejected", service_name=service, author=author, problems=len(problems), first=str(problems[0]))
    errors = [{"path": problem.path, "message": problem.message} for problem in problems]
    return json_response({"error": "invalid_config", "errors": errors}, status=422)


async def get_config(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    service = path_name(request, "service")
    authorize(request, "read", service)
    wait = wait_seconds(request)
    await record_poll(request, state, service)
    current = await state.store.latest(service)
    tag = config_etag(current.info.version, current.info.hash) if current is not None else None
    has = request.headers.get("If-None-Match") is not None
    # The plain "N" (gateways before the hashed ETag) still names version N: such a gateway keeps working, without
    # the protection against a restored store.
    if current is not None and not (matches(request, tag) or matches(request, etag(current.info.version))):
        return _config_response(state, service, current)
    if has and wait:
        # The caller has the latest (or waits for a first version): park until a newer number lands. Any other tag
        # (older, newer, or N with other content) was answered at once above.
        than = current.info.version if current is not None else 0
        newer = await long_poll(state, lambda: state.store.wait_newer(service, than, wait))
        if newer is not None:
            return _config_response(state, service, newer)
    if current is None:
        raise ApiError(404, "not_found", f"service {service!r} has no config yet")
    assert tag is not None
    return web.Response(status=304, headers={"ETag": tag})


def _config_response(state: ApiState, service: str, version: ConfigVersion) -> web.Response:
    info = version.info
    state.metrics.latest_version.labels(service).set(info.version)
    tag = config_etag(info.version, info.hash)
    cached = state.bodies.get(service)
    if cached is None or cached[1] != tag:
        body = encode(
            {
                "version": info.version,
                "config": version.document,
                "hash": info.hash,
                "author": info.author,
                "created_at": iso(info.created_at),
                "rollback_of": info.rollback_of,
            }
        )
        if cached is None or cached[0] <= info.version:  # an older version answered late never replaces it
            state.bodies[service] = (info.version, tag, body)
        cached = (info.version, tag, body)
    headers = {"ETag": tag, "Cache-Control": "no-cache"}
    return web.Response(body=cached[2], headers=headers, content_type="application/json")


async def get_versions(request: web.Request) -> web.Response:
    state = request.app[STATE]
    service = path_name(request, "service")
    authorize(request, "read", service)
    versions = await state.store.versions(service)
    if not versions:
        raise ApiError(404, "not_found", f"service {service!r} has no config yet")
    return json_response(
        {
            "versions": [
                {
                    "version": info.version,
                    "hash": info.hash,
                    "author": info.author,
                    "created_at": iso(info.created_at),
                    "rollback_of": info.rollback_of,
                }
                for info in versions
            ]
        }
    )
