"""The config service's aiohttp application: routes, and the one middleware every call passes through.

The middleware is where an ``ApiError`` becomes its JSON reply, where aiohttp's own 404/405 become the same JSON
shape, and where anything unexpected becomes a 500 logged with its traceback and never shown to the caller. It also
counts each call (``meshgate_configservice_requests_total{route,code}``, the route being the URL template) and
writes one ``request`` log line per call (with the caller's token *name*, never the token).

Handlers live by concept: ``configs.py``, ``bundles.py``, ``registry.py`` (instances), ``gateways.py`` (status),
``certificates.py`` (the mesh CA).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from gateway.configservice.bundles import BUNDLE_LIMIT, add_bundle_routes
from gateway.configservice.ca import MeshCA
from gateway.configservice.certificates import add_certificate_routes
from gateway.configservice.configs import add_config_routes
from gateway.configservice.gateways import add_gateway_routes
from gateway.configservice.http import CALLER, STATE, ApiError, ApiState, json_response
from gateway.configservice.registry import add_registry_routes

__all__ = ["build_app"]

log = structlog.get_logger("meshgate.configservice")

_CODES: Final = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}
# Scraped and probed every few seconds: logged only at debug, so they do not drown the calls that matter.
_QUIET: Final = frozenset({"/healthz", "/metrics"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(state: ApiState, ca: MeshCA | None = None) -> web.Application:
    """The API over ``state``'s store and tokens, and ``ca`` (without one, ``/v1/ca`` and ``/v1/certificates`` are
    not served). The caller runs it (``server.py``) and closes the store."""
    # Bodies are read and bounded by each handler (read_body), so aiohttp's own limit only has to let the largest
    # (a bundle) through.
    app = web.Application(middlewares=[_middleware], client_max_size=BUNDLE_LIMIT + 1)
    app[STATE] = state
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    add_config_routes(app)
    add_bundle_routes(app)
    add_registry_routes(app)
    add_gateway_routes(app)
    if ca is not None:
        add_certificate_routes(app, ca)

    async def stop_polls(_: web.Application) -> None:
        state.stop_polls()  # on_shutdown runs before aiohttp waits for handlers: parked polls answer 304 now

    app.on_shutdown.append(stop_polls)
    return app


async def _healthz(_: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as error:
        status = error.status
        return _error_response(error)
    except web.HTTPException as error:  # the router's 404/405, aiohttp's own 413
        status = error.status
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        code = _CODES.get(error.status, "error")
        return json_response({"error": code, "message": error.reason}, status=error.status, headers=headers)
    except ConnectionError as error:
        # The store (etcd) cannot be reached: the caller's request was fine and may be retried shortly.
        status = 503
        log.warning("store_unavailable", method=request.method, route=route, error=str(error))
        return json_response(
            {"error": "store_unavailable", "message": "the config store cannot be reached; retry shortly"},
            status=503,
            headers={"Retry-After": "1"},
        )
    except asyncio.CancelledError:
        status = 499  # the client went away (a long-poll it gave up on); nginx's code for it
        raise
    except Exception:
        log.exception("internal_error", method=request.method, route=route)
        return json_response({"error": "internal", "message": "internal error (logged)"}, status=500)
    finally:
        request.app[STATE].metrics.requests.labels(route, str(status)).inc()
        fields = {
            "method": request.method,
            "path": request.path,
            "route": route,
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "caller": request.get(CALLER),
        }
        if route in _QUIET:
            log.debug("request", **fields)
        else:
            log.info("request", **fields)


def _error_response(error: ApiError) -> web.Response:
    body: dict[str, object] = {"error": error.code, "message": error.message}
    if error.problems:
        body["errors"] = [{"path": problem.path, "message": problem.message} for problem in error.problems]
    return json_response(body, status=error.status, headers=error.headers or None)
