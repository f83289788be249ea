"""The access log from outside: one JSON line per request with the contract's fields, and no secrets."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Gateway, gateway

pytestmark = pytest.mark.e2e

FIELDS = {
    "timestamp", "level", "event", "service", "request_id", "method", "path", "route", "status", "duration_ms",
    "upstream", "attempts", "client_address", "decision_id", "reason",
}  # fmt: skip


def _access_lines(gw: Gateway, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:  # access lines are flushed every 0.5 s
        lines = [line for line in gw.logs() if line.get("event") == "request"]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_access_log_lines(tmp_path: Path, upstream_a: int) -> None:
    config = {
        "service": "shop",
        "routes": [{"name": "items", "match": {"path_prefix": "/items"}, "cluster": "c"}],
        "clusters": [{"name": "c", "endpoints": [f"127.0.0.1:{upstream_a}"]}],
    }
    with gateway(tmp_path, config) as gw:
        request = urllib.request.Request(
            f"{gw.url}/items//1?secret=q",
            headers={"Authorization": "Bearer very-secret-token", "Cookie": "session=also-secret"},
        )
        with urllib.request.urlopen(request) as response:
            proxied_id = response.headers["x-request-id"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{gw.url}/nowhere")
        local_id = refused.value.headers["x-request-id"]
        refused.value.close()
        lines = _access_lines(gw, 2)
        raw = gw.log_path.read_text()
    by_id = {line["request_id"]: line for line in lines}
    proxied, local = by_id[proxied_id], by_id[local_id]
    assert set(proxied) >= FIELDS
    assert proxied["service"] == "shop"
    assert proxied["path"] == "/items/1"  # normalized, no query string
    assert (proxied["route"], proxied["status"], proxied["upstream"], proxied["attempts"]) == ("items", 200, "c", 1)
    assert proxied["reason"] is None
    assert proxied["client_address"] == "127.0.0.1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", proxied["timestamp"])
    assert isinstance(proxied["duration_ms"], float)
    assert (local["route"], local["status"], local["reason"]) == ("unmatched", 404, "route_not_found")
    for secret in ("very-secret-token", "also-secret", "secret=q"):
        assert secret not in raw
