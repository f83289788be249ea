"""structlog JSON logging: one object per line on stdout, with the fields the contract promises.

Every line carries ``timestamp`` (ISO 8601 UTC), ``level``, ``event`` and ``service``; values bound with
``structlog.contextvars`` (request id, later trace ids) are merged in. Secret-bearing keys are redacted here, in the
one processor every line passes through, so no call site can leak them by accident. Records from the standard
``logging`` module (aiohttp's own loggers) are routed through the same pipeline.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["REDACTED", "SECRET_KEYS", "configure", "redact"]

REDACTED = "<redacted>"
# Lower-case keys whose values never reach a log line, wherever they appear in an event.
SECRET_KEYS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "token", "access_token", "id_token", "password"}
)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: replace secret values, one level deep into mappings (e.g. a headers dict)."""
    for key, value in event.items():
        if key.lower() in SECRET_KEYS:
            event[key] = REDACTED
        elif isinstance(value, dict):
            event[key] = {k: (REDACTED if k.lower() in SECRET_KEYS else v) for k, v in value.items()}
    return event


def configure(level: str = "info", service: str = "meshgate") -> None:
    """(Re)configure structlog and the stdlib root logger. Safe to call again on a reload (level change)."""

    def add_service(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("service", service)
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            add_service,
            redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        # Not cached: a reload may change the level, and bound loggers must pick that up.
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers[:] = [_StructlogHandler()]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # The data plane renders and logs protocol errors itself (server.py), so what still reaches "aiohttp.server"
    # is a real failure (e.g. an admin handler crash) and must stay visible. Access lines are meshgate's own.
    logging.getLogger("aiohttp.access").setLevel(logging.CRITICAL)


def _dumps(obj: Any, **_kwargs: Any) -> str:
    # structlog passes its own `default`; str() is enough for what the gateway logs (addresses, enums, paths).
    return json.dumps(obj, default=str, separators=(",", ":"))


class _StructlogHandler(logging.Handler):
    """Send stdlib log records through structlog so they come out as the same JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger(record.name)
        fields: dict[str, Any] = {"logger": record.name}
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        log.log(record.levelno, record.getMessage(), **fields)
