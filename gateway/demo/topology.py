"""The compose topology as local processes: which files, which commands, which ports (pure, no I/O).

``compose/`` is the one description of the demo deployment. Every port in it is unique across the whole
topology, so running it without Docker changes only host names: each compose service name (and ``0.0.0.0``) in a
``host:port`` becomes ``127.0.0.1`` (``localize``). One more difference, because no OPA server can run here: a
pushed ``authz`` with ``engine: opa`` is evaluated by the embedded engine on the bundle the OPA server would have
pulled (``embedded_authz``). Nothing else differs, which ``tests/e2e/test_demo.py`` checks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COMPOSE",
    "COMPOSE_HOSTS",
    "GATEWAYS",
    "OPA_BUNDLE",
    "PORTS",
    "ROOT",
    "Process",
    "embedded_authz",
    "localize",
    "localize_service",
]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
# The bundle compose's OPA server pulls from the config service (compose/opa/config.yaml).
OPA_BUNDLE = "authz"
COMPOSE_HOSTS = (
    "configservice",
    "idp",
    "orders",
    "payments",
    "payments-b",
    "opa",
    "jaeger",
    "redis",
    "prometheus",
    "grafana",
)
# service -> (listen port, admin port), as in compose/gateways/<service>.yaml.
GATEWAYS = {"orders": (8081, 9911), "payments": (8082, 9912)}
# Every fixed local port, by what uses it: checked free before anything starts.
PORTS = {
    "config service": 7000,
    "IdP": 7777,
    "orders app": 9001,
    "payments app": 9002,
    "payments-b app": 9003,
    "orders sidecar": 8081,
    "orders sidecar admin": 9911,
    "payments sidecar": 8082,
    "payments sidecar admin": 9912,
}
OPTIONAL_PORTS = {"trace store (OTLP)": 4318, "trace store (query)": 16686, "Prometheus": 9090, "Redis": 6379}

# A compose host name (or 0.0.0.0) followed by a port, not part of a longer name (`orders` in `orders-read` or in
# `idp.meshgate.demo` is left alone: only `host:port` and `scheme://host:port` shapes are addresses).
_HOST = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(h) for h in (*COMPOSE_HOSTS, "0.0.0.0")) + r")(?=:\d)")


def localize(value: Any) -> Any:
    """``value`` (a parsed YAML document or any part of one) with every compose ``host:port`` on 127.0.0.1."""
    if isinstance(value, str):
        return _HOST.sub("127.0.0.1", value)
    if isinstance(value, Mapping):
        return {key: localize(item) for key, item in value.items()}
    if isinstance(value, list):
        return [localize(item) for item in value]
    return value


def embedded_authz(authz: Mapping[str, Any]) -> dict[str, Any]:
    """An ``authz`` section as the demo runs it: ``engine: opa`` becomes the embedded engine on ``OPA_BUNDLE`` with
    the same decision path and failure mode (the OPA server's own timeout means nothing in-process)."""
    if authz.get("engine") != "opa":
        return dict(authz)
    kept = {key: value for key, value in authz.items() if key not in ("engine", "opa_url", "timeout")}
    return {"engine": "embedded", "bundle": OPA_BUNDLE, **kept}


def localize_service(document: Mapping[str, Any]) -> dict[str, Any]:
    """A seeded service config (compose/seed/services/*.yaml) as the demo pushes it."""
    local: dict[str, Any] = localize(document)
    if isinstance(local.get("authz"), Mapping):
        local["authz"] = embedded_authz(local["authz"])
    return local


@dataclass(frozen=True, slots=True)
class Process:
    """One process of the local stack: how to start it and how to know it is up."""

    name: str
    argv: list[str]
    ready_url: str | None  # GET answers 200 once it serves; None: started is enough
    env: dict[str, str] = field(default_factory=dict)
    optional: bool = False  # the demo goes on without it if it does not come up (Prometheus, the trace store)
