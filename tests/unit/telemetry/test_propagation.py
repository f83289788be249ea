"""Trace-context propagation: W3C traceparent/tracestate, B3 single and multi, and what goes to the upstream."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from telemetry.propagation import (
    Parent,
    extract,
    format_traceparent,
    inject_headers,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
W3C = ("tracecontext", "baggage")
B3 = ("tracecontext", "baggage", "b3", "b3multi")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{TRACE}-{SPAN}-01", Parent(int(TRACE, 16), int(SPAN, 16), True)),
        (f"00-{TRACE}-{SPAN}-00", Parent(int(TRACE, 16), int(SPAN, 16), False)),
        (f"00-{TRACE}-{SPAN}-03", Parent(int(TRACE, 16), int(SPAN, 16), True)),  # other flag bits ignored
        (f"  00-{TRACE}-{SPAN}-01 ", Parent(int(TRACE, 16), int(SPAN, 16), True)),
        # A future version may append fields; the first four are read as version 00's.
        (f"cc-{TRACE}-{SPAN}-01-what-the-future-holds", Parent(int(TRACE, 16), int(SPAN, 16), True)),
    ],
)
def test_traceparent_valid(value: str, expected: Parent) -> None:
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        f"00-{TRACE}-{SPAN}",  # flags missing
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper-case hex is invalid
        f"00-{TRACE[:-1]}-{SPAN}-01",  # short trace id
        f"00-{TRACE}-{SPAN}-1",  # one-digit flags
        f"00-{TRACE}-{SPAN}-zz",
        f"0-{TRACE}-{SPAN}-01",
    ],
)
def test_traceparent_invalid_starts_a_new_trace(value: str) -> None:
    assert parse_traceparent(value) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"{TRACE}-{SPAN}-1", Parent(int(TRACE, 16), int(SPAN, 16), True)),
        (f"{TRACE}-{SPAN}-0", Parent(int(TRACE, 16), int(SPAN, 16), False)),
        (f"{TRACE}-{SPAN}-d", Parent(int(TRACE, 16), int(SPAN, 16), True)),  # debug implies sampled
        (f"{TRACE}-{SPAN}", Parent(int(TRACE, 16), int(SPAN, 16), None)),  # decision deferred
        (f"{TRACE}-{SPAN}-1-{SPAN}", Parent(int(TRACE, 16), int(SPAN, 16), True)),
        (f"{TRACE[16:]}-{SPAN}-1", Parent(int(TRACE[16:], 16), int(SPAN, 16), True)),  # 64-bit trace id
        (f"{TRACE.upper()}-{SPAN}-1", Parent(int(TRACE, 16), int(SPAN, 16), True)),
        ("1", None),  # a lone sampling state carries no parent
        (f"{TRACE}-{'0' * 16}-1", None),
        (f"{TRACE[:20]}-{SPAN}-1", None),  # neither 16 nor 32 digits
    ],
)
def test_b3_single(value: str, expected: Parent | None) -> None:
    assert parse_b3_single(value) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            {"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-sampled": "1"},
            Parent(int(TRACE, 16), int(SPAN, 16), True),
        ),
        (
            {"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-sampled": "0"},
            Parent(int(TRACE, 16), int(SPAN, 16), False),
        ),
        ({"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-flags": "1"}, Parent(int(TRACE, 16), int(SPAN, 16), True)),
        ({"x-b3-traceid": TRACE, "x-b3-spanid": SPAN}, Parent(int(TRACE, 16), int(SPAN, 16), None)),
        ({"x-b3-traceid": TRACE}, None),
        ({"x-b3-traceid": "xyz", "x-b3-spanid": SPAN}, None),
    ],
)
def test_b3_multi(headers: dict[str, str], expected: Parent | None) -> None:
    assert parse_b3_multi(CIMultiDict(headers)) == expected


def test_extract_prefers_traceparent_and_keeps_tracestate() -> None:
    headers = {
        "traceparent": f"00-{TRACE}-{SPAN}-01",
        "tracestate": "vendor=abc,other=1",
        "b3": f"{'1' * 32}-{'2' * 16}-1",
    }
    parent = extract(CIMultiDict(headers), B3)
    assert parent == Parent(int(TRACE, 16), int(SPAN, 16), True, "vendor=abc,other=1")


def test_extract_ignores_oversized_tracestate() -> None:
    parent = extract(CIMultiDict({"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "a=" + "x" * 600}), W3C)
    assert parent is not None
    assert parent.tracestate is None


def test_extract_b3_only_when_configured() -> None:
    headers = CIMultiDict({"b3": f"{TRACE}-{SPAN}-1"})
    assert extract(headers, W3C) is None
    assert extract(headers, B3) == Parent(int(TRACE, 16), int(SPAN, 16), True)


def test_extract_falls_back_to_b3_when_traceparent_is_invalid() -> None:
    headers = CIMultiDict({"traceparent": "garbage", "x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-sampled": "1"})
    assert extract(headers, ("tracecontext", "b3multi")) == Parent(int(TRACE, 16), int(SPAN, 16), True)
    assert extract(headers, W3C) is None


def test_inject_w3c_only() -> None:
    out = inject_headers(int(TRACE, 16), 0x1234, True, None, W3C)
    assert out == {"traceparent": f"00-{TRACE}-0000000000001234-01"}


def test_inject_passes_tracestate_and_adds_b3() -> None:
    parent = Parent(int(TRACE, 16), int(SPAN, 16), False, "vendor=abc")
    out = inject_headers(int(TRACE, 16), 0xABC, False, parent, B3)
    assert out == {
        "traceparent": f"00-{TRACE}-0000000000000abc-00",
        "tracestate": "vendor=abc",
        "b3": f"{TRACE}-0000000000000abc-0",
        "x-b3-traceid": TRACE,
        "x-b3-spanid": "0000000000000abc",
        "x-b3-sampled": "0",
    }


def test_format_round_trips() -> None:
    value = format_traceparent(int(TRACE, 16), int(SPAN, 16), True)
    assert value == f"00-{TRACE}-{SPAN}-01"
    assert parse_traceparent(value) == Parent(int(TRACE, 16), int(SPAN, 16), True)


def test_several_tracestate_headers_are_one_list() -> None:
    headers = CIMultiDict([("traceparent", f"00-{TRACE}-{SPAN}-01"), ("tracestate", "a=1"), ("TraceState", "b=2")])
    parent = extract(headers, W3C)
    assert parent is not None
    assert parent.tracestate == "a=1,b=2"


def test_tracestate_without_a_valid_traceparent_is_discarded() -> None:
    assert extract(CIMultiDict({"traceparent": "garbage", "tracestate": "a=1"}), W3C) is None
