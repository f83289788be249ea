"""The instance registry: sidecars register their service instance with a TTL and heartbeat it; gateways watch it.

``PUT`` registers or refreshes (the heartbeat), ``DELETE`` leaves, ``GET`` lists the live ones. The list's version
(its ETag) moves on every join, leave, address change and expiry, and not on a heartbeat that changes nothing, so
a gateway with ``discovery: {registry: NAME}`` long-polls it like a config and wakes only for real changes,
expiries included. An empty list is a list (version 0), not a 404: a watcher may wait for the first instance.
"""

from __future__ import annotations

from typing import Final

import structlog
from aiohttp import web

from gateway.config.errors import Problem
from gateway.config.values import parse_address, parse_duration
from gateway.configservice.http import (
    STATE,
    ApiError,
    authorize,
    etag,
    iso,
    json_body,
    json_response,
    long_poll,
    matches,
    path_name,
    wait_seconds,
)
from gateway.configservice.store import InstanceList

__all__ = ["DEFAULT_TTL", "MAX_TTL", "MIN_TTL", "add_registry_routes"]

MIN_TTL: Final = 1.0
MAX_TTL: Final = 300.0
DEFAULT_TTL: Final = 10.0
_KEYS: Final = ("address", "ttl")

log = structlog.get_logger("meshgate.configservice")


def add_registry_routes(app: web.Application) -> None:
    app.router.add_put("/v1/services/{service}/instances/{id}", put_instance)
    app.router.add_delete("/v1/services/{service}/instances/{id}", delete_instance)
    app.router.add_get("/v1/services/{service}/instances", get_instances)


async def put_instance(request: web.Request) -> web.Response:
    state = request.app[STATE]
    service = path_name(request, "service")
    instance_id = path_name(request, "id")
    authorize(request, "register", service)
    body = await json_body(request)
    problems = [Problem(key, "unknown key") for key in body if key not in _KEYS]
    address = body.get("address")
    if not isinstance(address, str):
        problems.append(Problem("address", 'required: "host:port"'))
    else:
        try:
            parse_address(address)
        except ValueError as error:
            problems.append(Problem("address", str(error)))
    ttl = _ttl(body.get("ttl", "10s"), problems)
    if problems:
        errors = [{"path": p.path, "message": p.message} for p in problems]
        return json_response({"error": "invalid_instance", "errors": errors}, status=422)
    assert isinstance(address, str)
    assert ttl is not None
    instance = await state.store.put_instance(service, instance_id, address, ttl)
    return json_response({"id": instance.id, "address": instance.address, "expires_in": ttl})


def _ttl(value: object, problems: list[Problem]) -> float | None:
    if not isinstance(value, str):
        problems.append(Problem("ttl", 'expected a duration string like "10s"'))
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as error:
        problems.append(Problem("ttl", str(error)))
        return None
    if not MIN_TTL <= seconds <= MAX_TTL:
        problems.append(Problem("ttl", "must be 1s..5m"))
        return None
    return seconds


async def delete_instance(request: web.Request) -> web.Response:
    state = request.app[STATE]
    service = path_name(request, "service")
    instance_id = path_name(request, "id")
    authorize(request, "register", service)
    if not await state.store.delete_instance(service, instance_id):
        raise ApiError(404, "not_found", f"service {service!r} has no live instance {instance_id!r}")
    return web.Response(status=204)


async def get_instances(request: web.Request) -> web.Response:
    state = request.app[STATE]
    service = path_name(request, "service")
    # Any gateway token may read any service's instances: the orders sidecar discovers payments' instances, so a
    # token restricted to orders must not be refused here (it still cannot register instances for payments).
    authorize(request, "read", None)
    wait = wait_seconds(request)
    current = await state.store.instances(service)
    tag = etag(current.version)
    if not matches(request, tag):
        return _listing(current)
    if wait:
        newer = await long_poll(state, lambda: state.store.wait_instances(service, current.version, wait))
        if newer is not None:
            return _listing(newer)
    return web.Response(status=304, headers={"ETag": tag})


def _listing(listing: InstanceList) -> web.Response:
    instances = [{"id": i.id, "address": i.address, "expires_at": iso(i.expires_at)} for i in listing.instances]
    return json_response(
        {"version": listing.version, "instances": instances},
        headers={"ETag": etag(listing.version), "Cache-Control": "no-cache"},
    )
