"""OPA bundles: uploaded once, checked in the embedded engine, served by OPA's bundle service protocol.

``GET /v1/bundles/{name}`` answers the bytes exactly as uploaded with ``ETag: "<sha256>"`` and 304 on a matching
``If-None-Match``: what OPA's bundle downloader speaks, so an OPA sidecar configured with
``services: {meshgate: {url: http://cs:7000/v1, credentials: {bearer: {token: ...}}}}`` and
``bundles: {authz: {service: meshgate, resource: bundles/authz}}`` pulls the same bundle the embedded gateways do.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Final

import structlog
from aiohttp import web

from gateway.configservice.http import STATE, ApiError, authorize, etag, json_response, matches, path_name, read_body
from gateway.configservice.store import BundleRecord
from gateway.configservice.validate import check_bundle
from policy.bundle import MAX_BUNDLE_BYTES

__all__ = ["BUNDLE_LIMIT", "add_bundle_routes"]

BUNDLE_LIMIT: Final = MAX_BUNDLE_BYTES  # compressed here; the loader bounds the uncompressed size the same
REVISION_HEADER: Final = "X-Meshgate-Bundle-Revision"

log = structlog.get_logger("meshgate.configservice")


# The revision each bundle_info series shows, so a new revision replaces the old series instead of adding one.
_REVISIONS: Final = web.AppKey("configservice_bundle_revisions", dict[str, str])


def add_bundle_routes(app: web.Application) -> None:
    app[_REVISIONS] = {}
    app.router.add_put("/v1/bundles/{name}", put_bundle)
    app.router.add_get("/v1/bundles/{name}", get_bundle)


async def put_bundle(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = path_name(request, "name")
    token = authorize(request, "write", None)
    data = await read_body(request, BUNDLE_LIMIT, "the bundle")
    digest = hashlib.sha256(data).hexdigest()
    existing = await state.store.get_bundle(name)
    if existing is not None and existing.etag == digest:
        return json_response({"name": name, "revision": existing.revision, "etag": digest, "unchanged": True})
    # Parsing and checking Rego is CPU work: off the event loop.
    bundle, problems = await asyncio.to_thread(check_bundle, data)
    if bundle is None:
        log.info("bundle_rejected", bundle=name, author=token.name, first=str(problems[0]))
        errors = [{"path": problem.path, "message": problem.message} for problem in problems]
        return json_response({"error": "invalid_bundle", "errors": errors}, status=422)
    record = BundleRecord(name, data, digest, bundle.revision, token.name, state.clock())
    await state.store.put_bundle(record)
    _note_revision(request, name, bundle.revision)
    log.info("bundle_stored", bundle=name, revision=bundle.revision, author=token.name, bytes=len(data))
    return json_response(
        {"name": name, "revision": bundle.revision, "etag": digest}, status=201, headers={"ETag": etag(digest)}
    )


async def get_bundle(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = path_name(request, "name")
    authorize(request, "read", None)
    record = await state.store.get_bundle(name)
    if record is None:
        raise ApiError(404, "not_found", f"no bundle named {name!r}")
    _note_revision(request, name, record.revision)
    headers = {"ETag": etag(record.etag), "Cache-Control": "no-cache"}
    if record.revision.isascii() and record.revision.isprintable():  # a manifest may hold any string
        headers[REVISION_HEADER] = record.revision
    if matches(request, etag(record.etag)):
        return web.Response(status=304, headers=headers)
    return web.Response(body=record.data, headers=headers, content_type="application/gzip")


def _note_revision(request: web.Request, name: str, revision: str) -> None:
    revisions = request.app[_REVISIONS]
    if revisions.get(name) != revision:
        request.app[STATE].metrics.bundle_stored(name, revision, revisions.get(name))
        revisions[name] = revision
