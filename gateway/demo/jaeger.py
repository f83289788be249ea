"""OTLP spans as Jaeger's query API shows them, and Jaeger's trace search, as pure functions (no I/O).

The demo's local trace store (``traces.py``) keeps spans in these shapes and answers with them. The translation is
Jaeger's own for OTLP: the parent becomes a ``CHILD_OF`` reference, links ``FOLLOWS_FROM`` ones; the kind a
``span.kind`` tag; the status ``otel.status_code`` (and ``error: true`` on errors); events become logs with an
``event`` field; ``service.name`` names the process, the other resource attributes are its tags. A search matches
as Jaeger's memory store does: one span must match the service, the operation and every tag, tags compared as
Jaeger renders values (ints in decimal, booleans ``true``/``false``).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from multidict import MultiMapping
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

__all__ = [
    "Json",
    "Search",
    "StoredSpan",
    "convert",
    "normalize_trace_id",
    "parse_search",
    "tag",
    "tag_text",
    "trace_json",
]

Json = dict[str, Any]
NO_SERVICE = "OTLPResourceNoServiceName"  # Jaeger's service name for a resource without service.name
DEFAULT_LIMIT = 100  # Jaeger's default number of traces per search
DEFAULT_LOOKBACK_US = 2 * 86_400 * 10**6  # Jaeger searches the last two days unless told otherwise
_KINDS = dict(enumerate(("internal", "server", "client", "producer", "consumer"), start=Span.SPAN_KIND_INTERNAL))
_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h|d)")  # Go's durations, plus days for lookback
_MICROS = {"ns": 0.001, "us": 1, "µs": 1, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6, "d": 86_400e6}

# --- OTLP -> Jaeger JSON (pure) -------------------------------------------------------------------------------------


def _plain(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_plain(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return {pair.key: _plain(pair.value) for pair in value.kvlist_value.values}
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return None if which is None else getattr(value, which)


def tag(key: str, value: AnyValue) -> Json:
    """An OTLP attribute as a Jaeger tag; arrays and maps become JSON text, as Jaeger stores them."""
    which = value.WhichOneof("value")
    if which in ("array_value", "kvlist_value"):
        return {"key": key, "type": "string", "value": json.dumps(_plain(value), separators=(",", ":"))}
    kind = {"bool_value": "bool", "int_value": "int64", "double_value": "float64", "bytes_value": "binary"}
    return {"key": key, "type": kind.get(which or "", "string"), "value": _plain(value) if which else ""}


def tag_text(tag: Json) -> str:
    """A tag's value as Jaeger compares it with a searched value (Go's ``KeyValue.AsString``)."""
    kind, value = tag["type"], tag["value"]
    if kind == "bool":
        return "true" if value else "false"
    if kind == "float64":
        return format(value, ".10g")
    if kind == "binary":
        return base64.b64decode(value).hex()
    return str(value)


def _string(key: str, value: str) -> Json:
    return {"key": key, "type": "string", "value": value}


def _tags(attributes: Iterable[KeyValue]) -> list[Json]:
    return [tag(attribute.key, attribute.value) for attribute in attributes]


@dataclass(frozen=True, slots=True)
class StoredSpan:
    """One span in Jaeger's JSON shape (``processID`` is assigned per trace when rendered) and its process."""

    service: str
    process_tags: list[Json]
    process_key: str  # identifies the process within a trace
    span: Json
    pairs: frozenset[tuple[str, str]]  # (key, tag_text) of its tags, its process's tags and its logs' fields


def _span(span: Span, scope_tags: list[Json]) -> Json:
    trace_id = span.trace_id.hex()
    parent = [("CHILD_OF", span.trace_id, span.parent_span_id)] if span.parent_span_id else []
    links = [("FOLLOWS_FROM", link.trace_id, link.span_id) for link in span.links]
    references = [{"refType": r, "traceID": t.hex(), "spanID": s.hex()} for r, t, s in [*parent, *links]]
    tags = [*scope_tags, *_tags(span.attributes)]
    if span.kind in _KINDS:
        tags.append(_string("span.kind", _KINDS[span.kind]))
    if span.status.code == Status.STATUS_CODE_ERROR:
        tags += [_string("otel.status_code", "ERROR"), {"key": "error", "type": "bool", "value": True}]
    elif span.status.code == Status.STATUS_CODE_OK:
        tags.append(_string("otel.status_code", "OK"))
    if span.status.message:
        tags.append(_string("otel.status_description", span.status.message))
    if span.trace_state:
        tags.append(_string("w3c.tracestate", span.trace_state))
    logs = [
        {"timestamp": event.time_unix_nano // 1000, "fields": [_string("event", event.name), *_tags(event.attributes)]}
        for event in span.events
    ]
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    return {
        "traceID": trace_id,
        "spanID": span.span_id.hex(),
        "operationName": span.name,
        "references": references,
        "startTime": start // 1000,
        "duration": max(0, end - start) // 1000,
        "tags": tags,
        "logs": logs,
        "processID": "",
        "warnings": None,
    }


def convert(request: ExportTraceServiceRequest) -> tuple[list[StoredSpan], int]:
    """The spans of an export request, and how many were rejected (a trace id not 16 bytes or a span id not 8)."""
    spans: list[StoredSpan] = []
    rejected = 0
    for resource_spans in request.resource_spans:
        attributes = resource_spans.resource.attributes
        service = next((a.value.string_value for a in attributes if a.key == "service.name"), NO_SERVICE)
        process_tags = _tags(a for a in attributes if a.key != "service.name")
        process_key = json.dumps([service, process_tags], sort_keys=True)
        process_pairs = {(t["key"], tag_text(t)) for t in process_tags}
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope
            scope_tags = [
                _string(k, v) for k, v in (("otel.scope.name", scope.name), ("otel.scope.version", scope.version)) if v
            ]
            for span in scope_spans.spans:
                if len(span.trace_id) != 16 or len(span.span_id) != 8 or not any(span.trace_id):
                    rejected += 1
                    continue
                body = _span(span, scope_tags)
                fields = [t for log in body["logs"] for t in log["fields"]]
                pairs = frozenset(process_pairs | {(t["key"], tag_text(t)) for t in [*body["tags"], *fields]})
                spans.append(StoredSpan(service, process_tags, process_key, body, pairs))
    return spans, rejected


def trace_json(trace_id: str, spans: Sequence[StoredSpan], dropped: int = 0) -> Json:
    """One trace in Jaeger's JSON shape, processes numbered ``p1``, ``p2``... in order of first appearance."""
    process_ids: dict[str, str] = {}
    processes: dict[str, Json] = {}
    rendered = []
    for stored in spans:
        process_id = process_ids.get(stored.process_key)
        if process_id is None:
            process_id = process_ids[stored.process_key] = f"p{len(process_ids) + 1}"
            processes[process_id] = {"serviceName": stored.service, "tags": stored.process_tags}
        rendered.append({**stored.span, "processID": process_id})
    warnings = [f"{dropped} spans dropped: over this demo store's per-trace limit"] if dropped else None
    return {"traceID": trace_id, "spans": rendered, "processes": processes, "warnings": warnings}


def normalize_trace_id(text: str) -> str:
    """A trace id as 32 lower-case hex digits; Jaeger accepts any case and omitted leading zeros."""
    if len(text) > 32:
        raise ValueError(f"TraceID cannot be longer than 32 hex characters: {text}")
    if not text or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ValueError(f"cannot parse TraceID {text!r}: not hexadecimal")
    return text.lower().rjust(32, "0")


# --- search (pure) --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Search:
    """A parsed ``GET /api/traces`` query; times in microseconds."""

    service: str
    operation: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    limit: int = DEFAULT_LIMIT  # 0 or less: no limit, as in Jaeger
    start_min: int = 0
    start_max: int = 2**63

    def matches(self, stored: StoredSpan) -> bool:
        """Jaeger's rule: one span satisfies every condition, tags included."""
        span = stored.span
        return (
            stored.service == self.service
            and (not self.operation or span["operationName"] == self.operation)
            and self.start_min <= span["startTime"] <= self.start_max
            and all(pair in stored.pairs for pair in self.tags.items())
        )


def _number(params: MultiMapping[str], name: str) -> int | None:
    text = params.get(name, "")
    if text and not text.lstrip("-").isdigit():
        raise ValueError(f"unable to parse param '{name}': {text!r} is not an integer")
    return int(text) if text else None


def _lookback(text: str) -> int:
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"unable to parse param 'lookback': invalid duration {text!r}")
    return int(sum(float(number) * _MICROS[unit] for number, unit in parts))


def parse_search(params: MultiMapping[str], now_us: int) -> Search:
    """The query of ``GET /api/traces``, or ``ValueError`` with Jaeger's message for a bad one."""
    service = params.get("service", "")
    if not service:
        raise ValueError("parameter 'service' is required")
    tags: dict[str, str] = {}
    for simple in params.getall("tag", []):
        key, sep, value = simple.partition(":")
        if not sep:
            raise ValueError(f"malformed 'tag' parameter, expecting key:value, received: {simple}")
        tags[key] = value
    for text in params.getall("tags", []):
        try:
            parsed = json.loads(text)
        except ValueError as error:
            hint = "" if text.startswith("{") else " (curl removes {} unless given -g or --data-urlencode)"
            raise ValueError(f"malformed 'tags' parameter, cannot unmarshal JSON: {error}{hint}") from None
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise ValueError(
                "malformed 'tags' parameter, cannot unmarshal JSON: want an object of strings, as 403 → \"403\""
            )
        tags.update(parsed)
    limit, start, end = _number(params, "limit"), _number(params, "start"), _number(params, "end")
    if start is None:
        lookback = params.get("lookback", "custom")  # Jaeger's UI sends "custom" along with a start
        start = now_us - (DEFAULT_LOOKBACK_US if lookback == "custom" else _lookback(lookback))
    operation = params.get("operation", "")
    limit = DEFAULT_LIMIT if limit is None else limit
    return Search(service, operation, tags, limit, start, 2**63 if end is None else end)
