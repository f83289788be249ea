"""The authz stage's bookkeeping that no end-to-end run can reach in reasonable time: the shadow task bound."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.stages.authz import MAX_SHADOWS_IN_FLIGHT, AuthzStage, _loggable
from telemetry.access_log import AccessLog
from telemetry.logging import REDACTED
from telemetry.metrics import Metrics
from telemetry.tracing import Tracer


async def test_shadow_decisions_past_the_bound_are_skipped_and_counted() -> None:
    registry = CollectorRegistry()
    stage = AuthzStage(Metrics(registry), Tracer(), AccessLog())
    loop = asyncio.get_running_loop()
    busy: list[Any] = [loop.create_future() for _ in range(MAX_SHADOWS_IN_FLIGHT)]  # shadow tasks still running
    stage._shadows.update(busy)
    ctx: Any = SimpleNamespace(route=SimpleNamespace(name="r"))
    try:
        stage._start_shadow(ctx, None, None, {}, "id", "allow")  # type: ignore[arg-type]
        assert len(stage._shadows) == MAX_SHADOWS_IN_FLIGHT  # no task was started
        skipped = registry.get_sample_value(
            "meshgate_authz_shadow_decisions_total", {"http_route": "r", "decision": "skipped"}
        )
        assert skipped == 1.0
    finally:
        for future in busy:
            future.cancel()


def test_decision_log_input_masks_secret_query_parameters_in_parsed_query() -> None:
    document = {"parsed_query": {"code": ["c0de"], "SIG": ["s"], "x_token": ["t"], "page": ["2"]}, "other": 1}
    assert _loggable(document) == {
        "parsed_query": {"code": [REDACTED], "SIG": [REDACTED], "x_token": [REDACTED], "page": ["2"]},
        "other": 1,
    }
    assert document["parsed_query"]["code"] == ["c0de"]  # the policy's input is not touched
    plain = {"parsed_query": {"page": ["2"]}}
    assert _loggable(plain) is plain
