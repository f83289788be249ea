"""Gateway status: what each polling gateway says it applied (or refused), so an operator sees a rollout converge.

A gateway identifies itself on every config poll with ``X-Meshgate-Gateway: <id>`` and
``X-Meshgate-Applied-Version: <n>``; after refusing a version it adds ``X-Meshgate-Rejected-Version`` and
``X-Meshgate-Rejected-Error``. A refusal is kept until the gateway applies that version or a newer one, so it
shows whether the gateway repeats it on every poll or sends it once.

``meshgate_configservice_push_to_applied_seconds`` gets one sample when a gateway first reports a version applied
that was created while it was polling (created after its previous report): the rollout latency. A gateway
that comes back after an outage and catches up is not a sample; its catch-up says nothing about rollouts.
"""

from __future__ import annotations

from typing import Final

import structlog
from aiohttp import web

from gateway.config.config_service import GATEWAY_ID
from gateway.configservice.http import STATE, ApiError, ApiState, authorize, iso, json_response
from gateway.configservice.store import GatewayReport

__all__ = ["GATEWAY_HEADER", "MAX_ERROR", "add_gateway_routes", "load_reports", "record_poll"]

GATEWAY_HEADER: Final = "X-Meshgate-Gateway"
MAX_ERROR: Final = 300
REPORTS: Final = web.AppKey("configservice_reports", dict[tuple[str, str], GatewayReport])

log = structlog.get_logger("meshgate.configservice")


def add_gateway_routes(app: web.Application) -> None:
    app[REPORTS] = {}
    app.on_startup.append(load_reports)
    app.router.add_get("/v1/gateways", list_gateways)


async def load_reports(app: web.Application) -> None:
    """The last reports, from the store: after a restart, a gateway's next report is compared with them."""
    reports = app[REPORTS]
    for report in await app[STATE].store.gateways():
        reports[(report.service, report.id)] = report


async def record_poll(request: web.Request, state: ApiState, service: str) -> None:
    gateway = request.headers.get(GATEWAY_HEADER)
    if gateway is None:
        return
    if GATEWAY_ID.fullmatch(gateway) is None:
        raise ApiError(400, "bad_request", f'{GATEWAY_HEADER}: expected 1..128 of letters, digits, ".", "_", ":", "-"')
    applied = _version_header(request, "X-Meshgate-Applied-Version")
    rejected = _version_header(request, "X-Meshgate-Rejected-Version")
    error = request.headers.get("X-Meshgate-Rejected-Error", "")[:MAX_ERROR] if rejected else ""
    reports = request.app[REPORTS]
    key = (service, gateway)
    old = reports.get(key)
    if not rejected and old is not None and old.rejected_version > applied:
        rejected, error = old.rejected_version, old.error  # still refused: nothing newer applied since
    now = state.clock()
    report = GatewayReport(service, gateway, applied, rejected, error, now)
    reports[key] = report
    await state.store.report_gateway(report)
    state.metrics.applied_version.labels(service, gateway).set(applied)
    if old is None:
        log.info("gateway_seen", service_name=service, gateway=gateway, applied_version=applied)
    elif rejected and rejected != old.rejected_version:
        log.warning("gateway_rejected_version", service_name=service, gateway=gateway, version=rejected, error=error)
    if old is not None and applied > 0 and applied != old.applied_version:
        version = await state.store.get_version(service, applied)
        if version is not None and version.info.created_at >= old.last_seen:
            state.metrics.push_to_applied.observe(max(0.0, now - version.info.created_at))


def _version_header(request: web.Request, name: str) -> int:
    text = request.headers.get(name)
    if text is None:
        return 0
    if not text.isdigit() or len(text) > 18:
        raise ApiError(400, "bad_request", f"{name}: expected a version number, got {text[:40]!r}")
    return int(text)


async def list_gateways(request: web.Request) -> web.Response:
    state = request.app[STATE]
    token = authorize(request, "read", None)
    wanted = request.query.get("service") or token.service  # a restricted token sees its own service only
    if token.service is not None and wanted != token.service:
        raise ApiError(403, "forbidden", f"token {token.name!r} is restricted to service {token.service!r}")
    now = state.clock()
    rows = []
    latest: dict[str, int] = {}
    for report in await state.store.gateways():
        if wanted is not None and report.service != wanted:
            continue
        if report.service not in latest:
            current = await state.store.latest(report.service)
            latest[report.service] = current.info.version if current is not None else 0
        rows.append(
            {
                "service": report.service,
                "id": report.id,
                "applied_version": report.applied_version,
                "latest_version": latest[report.service],
                "rejected_version": report.rejected_version,
                "error": report.error,
                "last_seen": iso(report.last_seen),
                "last_seen_ago_s": round(max(0.0, now - report.last_seen), 3),
            }
        )
    return json_response({"gateways": rows})
