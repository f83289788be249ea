"""The access log: one JSON line per request, written without the general logging pipeline.

It is the one log line on the hot path, so it skips structlog's processor chain (measured: ~15 µs a line through
the chain against ~6 µs direct) and is not flushed per line: like Envoy's access log (1 s flush interval), lines
are buffered and flushed by ``flush`` on a short timer and at shutdown, and whenever another log line flushes the
shared stdout. Field names and formats are the same as every other log line (``telemetry.logging``); it carries no
secret-bearing fields, so no redaction pass is needed.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

__all__ = ["AccessLog"]

_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _iso_utc(now: float) -> str:
    seconds = int(now)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((now - seconds) * 1e6):06d}Z"


class AccessLog:
    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout

    def emit(self, service: str, fields: dict[str, Any]) -> None:
        """Write one ``event: "request"`` line; ``fields`` is consumed (the common fields are added to it)."""
        fields["event"] = "request"
        fields["level"] = "info"
        fields["timestamp"] = _iso_utc(time.time())
        fields["service"] = service
        self._stream.write(_encode(fields) + "\n")

    def flush(self) -> None:
        self._stream.flush()
