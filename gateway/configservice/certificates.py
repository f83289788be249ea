"""The mesh CA's API: ``GET /v1/ca`` (the trusted CA bundle) and ``POST /v1/certificates`` (sign a CSR).

``POST /v1/certificates`` takes a PEM CSR and answers a short-lived certificate for the service the caller's token
is bound to (``service`` in the tokens file): the identity comes from the token, never from the request. A token
without a service gets 403, whatever its role. ``GET /v1/ca`` answers the PEM bundle of every trusted CA (the
signing one first) with ``ETag: "<sha256>"``, so gateways can poll it cheaply with ``If-None-Match``.
"""

from __future__ import annotations

import datetime
from typing import Final

import structlog
from aiohttp import web

from gateway.configservice.ca import CsrError, MeshCA, new_serial
from gateway.configservice.http import STATE, ApiError, authorize, etag, iso, json_response, matches, read_body

__all__ = ["CSR_LIMIT", "MESH_CA", "PEM_TYPE", "add_certificate_routes"]

MESH_CA: Final = web.AppKey("configservice_mesh_ca", MeshCA)
CSR_LIMIT: Final = 16 * 1024  # a P-384 or RSA-4096 CSR is 1-2 KiB
PEM_TYPE: Final = "application/x-pem-file"
_CSR_TYPES: Final = frozenset({PEM_TYPE, "application/pkcs10"})

log = structlog.get_logger("meshgate.configservice")


def add_certificate_routes(app: web.Application, ca: MeshCA) -> None:
    app[MESH_CA] = ca
    app.router.add_get("/v1/ca", _get_ca)
    app.router.add_post("/v1/certificates", _post_certificate)


async def _get_ca(request: web.Request) -> web.Response:
    authorize(request, "read", None)
    ca = request.app[MESH_CA]
    tag = etag(ca.bundle_hash)
    if matches(request, tag):
        return web.Response(status=304, headers={"ETag": tag})
    return web.Response(body=ca.bundle, headers={"ETag": tag, "Content-Type": PEM_TYPE})


async def _post_certificate(request: web.Request) -> web.Response:
    token = authorize(request, "read", None)
    if token.service is None:
        raise ApiError(
            403,
            "forbidden",
            f"token {token.name!r} is not bound to a service; a mesh certificate is issued for a token's service",
        )
    # A missing Content-Type reads as application/octet-stream: refused too, so a client cannot send a body that
    # was meant for something else.
    if request.content_type not in _CSR_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the CSR as {PEM_TYPE} or application/pkcs10, not {request.content_type}",
        )
    body = await read_body(request, CSR_LIMIT, "the certificate signing request")
    ca = request.app[MESH_CA]
    state = request.app[STATE]
    now = datetime.datetime.fromtimestamp(state.clock(), datetime.UTC)
    try:
        issued = ca.issue(body, token.service, now, new_serial())
    except CsrError as error:
        raise ApiError(400, "invalid_csr", str(error)) from None
    state.metrics.certificates_issued.labels(token.service).inc()
    not_after = iso(issued.not_after.timestamp())
    # The service is logged as service_name (`service` is the process's own); never any key material.
    log.info(
        "certificate_issued",
        service_name=token.service,
        identity=issued.identity,
        serial=issued.serial_hex,
        not_after=not_after,
        caller=token.name,
    )
    answer = {
        "certificate": issued.pem.decode(),
        "ca": ca.bundle.decode(),
        "identity": issued.identity,
        "not_after": not_after,
        "serial": issued.serial_hex,
    }
    return json_response(answer, status=201)
