"""Trace-context propagation, pure: parse what the client sent, format what the upstream gets.

W3C Trace Context (``traceparent``/``tracestate``) and W3C Baggage always; Zipkin B3 (single ``b3`` header or the
``X-B3-*`` set) when configured. Hand-written instead of OpenTelemetry's propagators: they go through the
context API (a contextvar token, a ``Context`` dict and a carrier getter per header) for what is a split and a few
hex checks, and the gateway does this on every request.

An invalid header is ignored, never an error: the W3C spec says a receiver that cannot parse ``traceparent`` starts a
new trace, and so does B3. An all-zero trace or span id is invalid (both specs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from multidict import MultiMapping

from telemetry.settings import Propagator

__all__ = ["B3_MULTI", "Parent", "extract", "format_b3", "format_traceparent", "inject_headers"]

_HEX = frozenset("0123456789abcdef")
# The W3C limits: 32 list members; vendors cap the header at 512 bytes, which is what we forward at most.
_MAX_TRACESTATE = 512
B3_MULTI = ("x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags")


@dataclass(frozen=True, slots=True)
class Parent:
    """The remote parent span the client told us about."""

    trace_id: int
    span_id: int
    sampled: bool | None  # None: the client left the decision to us (B3 without a sampling state)
    tracestate: str | None = None


def _hex_id(text: str, length: int) -> int:
    """The id as an int, or 0 when ``text`` is not exactly ``length`` lower-case hex digits (0 is invalid)."""
    if len(text) != length or not _HEX.issuperset(text):
        return 0
    return int(text, 16)


def parse_traceparent(value: str) -> Parent | None:
    """``00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>``; a later version may append ``-`` fields."""
    parts = value.strip().split("-")
    if len(parts) < 4:
        return None
    version, trace, span, flags = parts[0], parts[1], parts[2], parts[3]
    if len(version) != 2 or not _HEX.issuperset(version) or version == "ff":
        return None
    if version == "00" and len(parts) != 4:
        return None  # version 00 has exactly four fields
    trace_id, span_id = _hex_id(trace, 32), _hex_id(span, 16)
    if not trace_id or not span_id or len(flags) != 2 or not _HEX.issuperset(flags):
        return None
    return Parent(trace_id, span_id, bool(int(flags, 16) & 1))


def _b3_id(text: str) -> int:
    # B3 trace ids are 16 or 32 hex; a 64-bit one is left-padded to the W3C width.
    return _hex_id(text.lower(), 32) if len(text) == 32 else _hex_id(text.lower(), 16)


def _b3_sampled(flag: str | None) -> bool | None:
    if flag is None:
        return None
    flag = flag.strip().lower()
    if flag in ("1", "d", "true"):  # "d" is debug, which implies sampled
        return True
    if flag in ("0", "false"):
        return False
    return None


def parse_b3_single(value: str) -> Parent | None:
    """``{TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]``; a lone sampling state carries no parent."""
    parts = value.strip().split("-")
    if len(parts) < 2:
        return None
    trace_id, span_id = _b3_id(parts[0]), _hex_id(parts[1].lower(), 16)
    if not trace_id or not span_id:
        return None
    return Parent(trace_id, span_id, _b3_sampled(parts[2]) if len(parts) > 2 else None)


def parse_b3_multi(headers: MultiMapping[str]) -> Parent | None:
    trace, span = headers.get("x-b3-traceid"), headers.get("x-b3-spanid")
    if trace is None or span is None:
        return None
    trace_id, span_id = _b3_id(trace.strip()), _hex_id(span.strip().lower(), 16)
    if not trace_id or not span_id:
        return None
    sampled = True if headers.get("x-b3-flags", "").strip() == "1" else _b3_sampled(headers.get("x-b3-sampled"))
    return Parent(trace_id, span_id, sampled)


def extract(headers: MultiMapping[str], propagators: tuple[Propagator, ...]) -> Parent | None:
    """The client's span context: ``traceparent`` first (it is the standard), then B3 if configured.

    ``tracestate`` is kept only with a valid ``traceparent`` (W3C: discard it otherwise); several ``tracestate``
    headers are one list, joined with commas.
    """
    value = headers.get("traceparent")
    if value is not None:
        parent = parse_traceparent(value)
        if parent is not None:
            state = ",".join(headers.getall("tracestate", ()))
            if state and len(state) <= _MAX_TRACESTATE:
                return replace(parent, tracestate=state)
            return parent
    if "b3" in propagators:
        value = headers.get("b3")
        if value is not None:
            parent = parse_b3_single(value)
            if parent is not None:
                return parent
    if "b3multi" in propagators or "b3" in propagators:
        return parse_b3_multi(headers)
    return None


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def format_b3(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"{trace_id:032x}-{span_id:016x}-{'1' if sampled else '0'}"


def inject_headers(
    trace_id: int, span_id: int, sampled: bool, parent: Parent | None, propagators: tuple[Propagator, ...]
) -> dict[str, str]:
    """The context headers for one upstream attempt; the caller sets them over the forwarded headers.

    ``traceparent`` always (the contract: the upstream continues the trace); ``tracestate`` is passed on as the client
    sent it (we add no vendor entry of our own). Baggage is passed on untouched with the other headers: the gateway
    adds nothing to it, so re-encoding it would only risk changing it.
    """
    out = {"traceparent": format_traceparent(trace_id, span_id, sampled)}
    if parent is not None and parent.tracestate is not None:
        out["tracestate"] = parent.tracestate
    if "b3" in propagators:
        out["b3"] = format_b3(trace_id, span_id, sampled)
    if "b3multi" in propagators:
        out["x-b3-traceid"] = f"{trace_id:032x}"
        out["x-b3-spanid"] = f"{span_id:016x}"
        out["x-b3-sampled"] = "1" if sampled else "0"
    return out
