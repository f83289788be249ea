"""gateway.headers: path normalization, header rewriting, request ids, client address."""

from __future__ import annotations

import random
import re
import uuid

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import BadRequest
from gateway.headers import (
    HOP_BY_HOP,
    UNKNOWN_CLIENT,
    EscapedSlashes,
    client_ip_and_port,
    downstream_response_headers,
    new_request_id,
    normalize_path,
    request_id_from,
    upstream_request_headers,
)

MODES: tuple[EscapedSlashes, ...] = ("unescape", "reject", "keep")

# --------------------------------------------------------------------------------------------------------------------
# normalize_path
# --------------------------------------------------------------------------------------------------------------------

# (raw, expected) holding in every mode: nothing here involves escaped slashes or backslashes.
SAME_IN_EVERY_MODE = [
    pytest.param("/", "/", id="root"),
    pytest.param("/orders", "/orders", id="plain"),
    pytest.param("/orders/", "/orders/", id="trailing-slash-kept"),
    pytest.param("/a/b/c.json", "/a/b/c.json", id="dot-inside-segment"),
    pytest.param("/.well-known/acme", "/.well-known/acme", id="dot-prefixed-segment-not-a-dot-segment"),
    pytest.param("/a/..b/c", "/a/..b/c", id="dotdot-prefixed-segment"),
    pytest.param("/a/b../c", "/a/b../c", id="dotdot-suffixed-segment"),
    pytest.param("/a/.../c", "/a/.../c", id="three-dots-is-a-name"),
    pytest.param("/a//b", "/a/b", id="merge-double-slash"),
    pytest.param("/a///b////", "/a/b/", id="merge-many-slashes"),
    pytest.param("//", "/", id="double-slash-root"),
    pytest.param("/./", "/", id="dot-at-root"),
    pytest.param("/.", "/", id="dot-only"),
    pytest.param("/..", "/", id="dotdot-only"),
    pytest.param("/../a", "/a", id="dotdot-above-root-stays-at-root"),
    pytest.param("/../../../etc/passwd", "/etc/passwd", id="many-dotdot-above-root"),
    pytest.param("/a/./b", "/a/b", id="remove-dot"),
    pytest.param("/a/b/../c", "/a/c", id="remove-dotdot"),
    pytest.param("/a/b/..", "/a/", id="trailing-dotdot-keeps-slash"),
    pytest.param("/a/b/.", "/a/b/", id="trailing-dot-keeps-slash"),
    pytest.param("/a/b/../..", "/", id="dotdot-back-to-root"),
    pytest.param("/a/.//./b", "/a/b", id="dots-and-empty-segments"),
    pytest.param("/%61%62%63", "/abc", id="decode-unreserved-alpha"),
    pytest.param("/%41%5A%30%39", "/AZ09", id="decode-unreserved-upper-digits"),
    pytest.param("/%2D%2e%5F%7e", "/-._~", id="decode-unreserved-marks"),
    pytest.param("/a%20b", "/a%20b", id="space-escape-kept"),
    pytest.param("/a%3fb", "/a%3Fb", id="reserved-escape-uppercased"),
    pytest.param("/%c3%a9t%C3%A9", "/%C3%A9t%C3%A9", id="utf8-escapes-uppercased"),
    pytest.param("/%25", "/%25", id="percent-escape-not-decoded"),
    pytest.param("/%252e%252e/x", "/%252e%252e/x", id="no-double-decoding"),
    pytest.param("/%2e", "/", id="escaped-dot-at-root"),
    pytest.param("/a/%2e%2E/b", "/b", id="escaped-dotdot-mixed-case"),
    pytest.param("/a/.%2e/b", "/b", id="half-escaped-dotdot"),
    pytest.param("/a/%2e/b", "/a/b", id="escaped-dot"),
    pytest.param("/a/%2e%2e%2e/b", "/a/.../b", id="escaped-three-dots-is-a-name"),
    pytest.param("/a;b=c/d", "/a;b=c/d", id="sub-delims-kept"),
    pytest.param("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,=", id="pchar-specials-kept"),
    pytest.param("/a|b{c}^`[d]", "/a|b{c}^`[d]", id="lenient-ascii-kept"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("raw", "expected"), SAME_IN_EVERY_MODE)
def test_normalize_path(raw: str, expected: str, mode: EscapedSlashes) -> None:
    assert normalize_path(raw, mode) == expected


SLASH_CASES = [
    # raw, mode, expected (str) or BadRequest message (prefixed "!")
    pytest.param("/a/%2Fb", "unescape", "/a/b", id="unescape-%2F-then-merge"),
    pytest.param("/a%2fb", "unescape", "/a/b", id="unescape-lowercase-%2f"),
    pytest.param("/a%5Cb", "unescape", "/a/b", id="unescape-%5C-to-slash"),
    pytest.param("/a\\b", "unescape", "/a/b", id="unescape-raw-backslash-to-slash"),
    pytest.param("/a\\..\\b", "unescape", "/b", id="unescape-backslash-traversal"),
    pytest.param("/a%2f", "unescape", "/a/", id="unescape-trailing-%2f"),
    pytest.param("/a/%2Fb", "keep", "/a/%2Fb", id="keep-%2F"),
    pytest.param("/a%2fb", "keep", "/a%2Fb", id="keep-uppercases-%2f"),
    pytest.param("/a%5cb", "keep", "/a%5Cb", id="keep-uppercases-%5c"),
    pytest.param("/a\\b", "keep", "/a/b", id="keep-raw-backslash-is-a-slash"),
    pytest.param("/a/..%2Fb", "keep", "/a/..%2Fb", id="keep-dotdot-with-escaped-slash-is-one-segment"),
    pytest.param("/a/%2Fb", "reject", "!escaped slash in path", id="reject-%2F"),
    pytest.param("/a%2fb", "reject", "!escaped slash in path", id="reject-%2f"),
    pytest.param("/a%5Cb", "reject", "!escaped slash in path", id="reject-%5C"),
    pytest.param("/a%5cb", "reject", "!escaped slash in path", id="reject-%5c"),
    pytest.param("/a\\b", "reject", "!backslash in path", id="reject-raw-backslash"),
]


@pytest.mark.parametrize(("raw", "mode", "expected"), SLASH_CASES)
def test_normalize_path_escaped_slashes(raw: str, mode: EscapedSlashes, expected: str) -> None:
    if expected.startswith("!"):
        with pytest.raises(BadRequest, match=f"^{re.escape(expected[1:])}$"):
            normalize_path(raw, mode)
    else:
        assert normalize_path(raw, mode) == expected


REJECTED = [
    pytest.param("", "path must start with '/'", id="empty"),
    pytest.param("orders", "path must start with '/'", id="relative"),
    pytest.param("*", "path must start with '/'", id="asterisk-form"),
    pytest.param("http://h/x", "path must start with '/'", id="absolute-form"),
    pytest.param("/a\x00b", "invalid character in path", id="raw-nul"),
    pytest.param("/a\rb", "invalid character in path", id="raw-cr"),
    pytest.param("/a\nb", "invalid character in path", id="raw-lf"),
    pytest.param("/a\tb", "invalid character in path", id="raw-tab"),
    pytest.param("/a\x7fb", "invalid character in path", id="raw-del"),
    pytest.param("/a b", "invalid character in path", id="raw-space"),
    pytest.param("/caf\u00e9", "invalid character in path", id="non-ascii"),
    pytest.param("/a\udcff", "invalid character in path", id="surrogate-escaped-byte"),
    pytest.param("/admin#x", "invalid character in path", id="fragment"),
    pytest.param("/a%00b", "encoded NUL (%00) in path", id="escaped-nul"),
    pytest.param("/a%zz", "invalid percent-encoding in path", id="non-hex-escape"),
    pytest.param("/a%4", "invalid percent-encoding in path", id="truncated-escape-one-digit"),
    pytest.param("/a%", "invalid percent-encoding in path", id="truncated-escape-bare"),
    pytest.param("/a%%41", "invalid percent-encoding in path", id="percent-percent"),
    pytest.param("/a%4g", "invalid percent-encoding in path", id="half-hex-escape"),
    pytest.param("/a%-1", "invalid percent-encoding in path", id="signed-escape"),
    pytest.param("/a%\u0661\u0662", "invalid character in path", id="unicode-digits-escape"),
    pytest.param("/a%0a\x01", "invalid character in path", id="control-char-wins-on-slow-path"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("raw", "message"), REJECTED)
def test_normalize_path_rejects(raw: str, message: str, mode: EscapedSlashes) -> None:
    with pytest.raises(BadRequest, match=f"^{re.escape(message)}$") as info:
        normalize_path(raw, mode)
    assert info.value.status == 400
    assert info.value.code == "bad_request"


# Traversal attacks: the path every component sees after normalization, per mode ("!" = rejected).
TRAVERSALS = [
    pytest.param("/public/../admin", "/admin", "/admin", "/admin", id="dotdot"),
    pytest.param("/public/%2e%2e/admin", "/admin", "/admin", "/admin", id="escaped-dotdot"),
    pytest.param("/public/%2E%2E/admin", "/admin", "/admin", "/admin", id="escaped-dotdot-upper"),
    pytest.param("/public/..%2fadmin", "/admin", "!", "/public/..%2Fadmin", id="dotdot-escaped-slash"),
    pytest.param("/public/%2E%2E%2Fadmin", "/admin", "!", "/public/..%2Fadmin", id="all-escaped"),
    pytest.param("/public/..%5cadmin", "/admin", "!", "/public/..%5Cadmin", id="dotdot-escaped-backslash"),
    pytest.param("/public/..\\admin", "/admin", "!", "/admin", id="dotdot-raw-backslash"),
    pytest.param("//admin", "/admin", "/admin", "/admin", id="double-slash"),
    pytest.param("/public/./../admin", "/admin", "/admin", "/admin", id="dot-then-dotdot"),
    pytest.param("/public/.%2e/admin", "/admin", "/admin", "/admin", id="half-escaped-dotdot"),
    pytest.param("/public//../admin", "/admin", "/admin", "/admin", id="merge-before-dots"),
    pytest.param("/public/%252e%252e/admin", *(["/public/%252e%252e/admin"] * 3), id="double-encoded-stays-data"),
]


@pytest.mark.parametrize(("raw", "unescape", "reject", "keep"), TRAVERSALS)
def test_traversal_attacks(raw: str, unescape: str, reject: str, keep: str) -> None:
    expected_by_mode: dict[EscapedSlashes, str] = {"unescape": unescape, "reject": reject, "keep": keep}
    for mode, expected in expected_by_mode.items():
        if expected == "!":
            with pytest.raises(BadRequest):
                normalize_path(raw, mode)
        else:
            assert normalize_path(raw, mode) == expected, mode


@pytest.mark.parametrize(
    "raw",
    ["/", "/orders", "/orders/1/items", "/a-b_c~d.e/f:g@h", "/v1/x.json", "/a|b", "/a..b/c."],
)
@pytest.mark.parametrize("mode", MODES)
def test_fast_path_returns_the_same_object(raw: str, mode: EscapedSlashes) -> None:
    assert normalize_path(raw, mode) is raw


TRICKY = [
    "/", "//", "///", "/.", "/..", "/./", "/../", "/a/.", "/a/..", "/a/./", "/a/../", "/a//b//", "/a/b/../../..",
    "/%2e", "/%2e%2e", "/%2E%2e/%2e", "/.%2e/..", "/a/%2e%2e%2f..", "/a%2f%2f%2fb", "/a%2F..%2F..%2Fb",
    "/%2f%2e%2e%2f", "/a%5c..%5cb", "/a\\..\\b", "/a\\\\b", "/%25", "/%252f", "/%25%32%66", "/%2541", "/%7E%7e",
    "/%41/%2e%41", "/a/%2e%2e%2e/b", "/..%2f..%2f", "/a/b/%2e%2e/%2E/c/", "/~user/%7euser", "/x%3a%3A%3b",
]  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("raw", TRICKY)
def test_normalize_path_is_idempotent(raw: str, mode: EscapedSlashes) -> None:
    try:
        once = normalize_path(raw, mode)
    except BadRequest:
        return  # rejected in this mode (escaped slashes under "reject"): nothing to be idempotent about
    assert normalize_path(once, mode) == once
    _assert_canonical(once, mode)


def _assert_canonical(path: str, mode: EscapedSlashes) -> None:
    assert path.startswith("/")
    assert "//" not in path
    assert "\\" not in path
    segments = path.split("/")
    assert "." not in segments
    assert ".." not in segments
    for escape in re.findall(r"%(..)", path):
        assert escape == escape.upper(), path
        assert chr(int(escape, 16)) not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
        if mode == "unescape":
            assert escape not in ("2F", "5C"), path


@pytest.mark.parametrize("mode", MODES)
def test_normalize_path_fuzz_idempotent_and_canonical(mode: EscapedSlashes) -> None:
    # Seeded, so a failure reproduces; pieces chosen to collide (escaped dots and slashes next to real ones).
    pieces = ["/", "/", ".", "..", "%2e", "%2E", "%2f", "%5C", "\\", "a", "%41", "%25", "%2525", "~", "%7e", "%3F"]
    rng = random.Random(1234)
    checked = 0
    for _ in range(3000):
        raw = "/" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        try:
            once = normalize_path(raw, mode)
        except BadRequest:
            continue
        checked += 1
        assert normalize_path(once, mode) == once, raw
        _assert_canonical(once, mode)
    assert checked > 100


# --------------------------------------------------------------------------------------------------------------------
# upstream_request_headers
# --------------------------------------------------------------------------------------------------------------------


def _proxy(*items: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(items))


def _upstream(
    *items: tuple[str, str],
    client_ip: str = "10.1.2.3",
    scheme: str = "http",
    request_id: str = "rid-1",
    host_override: str | None = None,
) -> CIMultiDict[str]:
    return upstream_request_headers(
        _proxy(*items), client_ip=client_ip, scheme=scheme, request_id=request_id, host_override=host_override
    )


def test_hop_by_hop_set() -> None:
    assert {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    } == HOP_BY_HOP


@pytest.mark.parametrize(
    "name",
    [*sorted(HOP_BY_HOP), "expect", "Connection", "KEEP-ALIVE", "Transfer-Encoding", "Expect", "TE"],
)
def test_upstream_drops_hop_by_hop_and_expect(name: str) -> None:
    out = _upstream(("Host", "h"), (name, "x"), ("Accept", "*/*"))
    assert name not in out
    assert out["Accept"] == "*/*"


@pytest.mark.parametrize(
    ("connection", "dropped", "kept"),
    [
        pytest.param("close, X-Secret", ["x-secret"], ["accept"], id="named-header-dropped"),
        pytest.param("X-A,X-B", ["x-a", "x-b"], ["accept"], id="several-no-space"),
        pytest.param("  x-a  ,  , X-B ", ["x-a", "x-b"], ["accept"], id="whitespace-and-empty-tokens"),
        pytest.param("keep-alive", [], ["x-a", "x-b", "accept"], id="option-only"),
        pytest.param("host, content-length", [], ["host", "content-length"], id="cannot-drop-host-or-length"),
    ],
)
def test_upstream_drops_connection_named_headers(connection: str, dropped: list[str], kept: list[str]) -> None:
    out = _upstream(
        ("Host", "h"),
        ("Content-Length", "3"),
        ("Connection", connection),
        ("X-A", "1"),
        ("X-B", "2"),
        ("X-Secret", "s"),
        ("Accept", "*/*"),
    )
    for name in dropped:
        assert name not in out
    for name in kept:
        assert name in out


def test_upstream_connection_named_across_several_connection_headers() -> None:
    out = _upstream(("Connection", "keep-alive"), ("Connection", "x-a"), ("X-A", "1"), ("X-B", "2"))
    assert "x-a" not in out
    assert out["x-b"] == "2"


def test_upstream_copies_other_headers_in_order_with_repeats() -> None:
    out = _upstream(
        ("Host", "orders.local"),
        ("Accept", "a"),
        ("Cookie", "c1=1"),
        ("Authorization", "Bearer t"),
        ("Cookie", "c2=2"),
        ("Content-Length", "42"),
        ("traceparent", "00-abc-def-01"),
    )
    assert out.getall("Cookie") == ["c1=1", "c2=2"]
    assert out["Content-Length"] == "42"
    assert out["Authorization"] == "Bearer t"
    assert out["traceparent"] == "00-abc-def-01"
    copied = [k for k, _ in out.items() if not k.lower().startswith("x-")]
    assert copied == ["Host", "Accept", "Cookie", "Authorization", "Cookie", "Content-Length", "traceparent"]


def test_upstream_does_not_mutate_input() -> None:
    raw: CIMultiDict[str] = CIMultiDict([("Host", "h"), ("Connection", "x-a"), ("X-A", "1")])
    upstream_request_headers(
        CIMultiDictProxy(raw), client_ip="1.1.1.1", scheme="http", request_id="r", host_override="o"
    )
    assert list(raw.items()) == [("Host", "h"), ("Connection", "x-a"), ("X-A", "1")]


@pytest.mark.parametrize(
    ("items", "expected_length"),
    [
        pytest.param([("Content-Length", "5")], "5", id="length-kept"),
        pytest.param(
            [("Content-Length", "5"), ("Transfer-Encoding", "chunked")], None, id="te-and-length-drops-length"
        ),
        pytest.param([("Transfer-Encoding", "chunked")], None, id="chunked-only"),
    ],
)
def test_upstream_content_length(items: list[tuple[str, str]], expected_length: str | None) -> None:
    out = _upstream(("Host", "h"), *items)
    assert out.get("Content-Length") == expected_length
    assert "Transfer-Encoding" not in out


@pytest.mark.parametrize(
    ("items", "override", "host", "forwarded_host"),
    [
        pytest.param([("Host", "api.example:8080")], None, "api.example:8080", "api.example:8080", id="host-kept"),
        pytest.param([("Host", "api.example")], "orders.svc", "orders.svc", "api.example", id="host-override"),
        pytest.param(
            [("Host", "api.example"), ("X-Forwarded-Host", "edge.example")],
            None,
            "api.example",
            "edge.example",
            id="client-forwarded-host-kept",
        ),
        pytest.param([], None, None, None, id="no-host-no-forwarded-host"),
        pytest.param([], "orders.svc", "orders.svc", None, id="no-host-override-still-set"),
    ],
)
def test_upstream_host_and_forwarded_host(
    items: list[tuple[str, str]], override: str | None, host: str | None, forwarded_host: str | None
) -> None:
    out = _upstream(*items, host_override=override)
    assert out.get("Host") == host
    assert out.getall("Host", []) == ([host] if host else [])
    assert out.get("X-Forwarded-Host") == forwarded_host


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        pytest.param([], "10.1.2.3", id="first-hop"),
        pytest.param([("X-Forwarded-For", "1.1.1.1")], "1.1.1.1, 10.1.2.3", id="appended"),
        pytest.param([("x-forwarded-for", "1.1.1.1, 2.2.2.2")], "1.1.1.1, 2.2.2.2, 10.1.2.3", id="appended-to-list"),
        pytest.param(
            [("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2")],
            "1.1.1.1, 2.2.2.2, 10.1.2.3",
            id="repeated-headers-joined",
        ),
    ],
)
def test_upstream_x_forwarded_for(items: list[tuple[str, str]], expected: str) -> None:
    out = _upstream(("Host", "h"), *items)
    assert out.getall("X-Forwarded-For") == [expected]


@pytest.mark.parametrize(
    ("items", "scheme"),
    [
        pytest.param([], "http", id="set-http"),
        pytest.param([], "https", id="set-https"),
        pytest.param([("X-Forwarded-Proto", "https")], "http", id="client-claim-overwritten"),
        pytest.param([("X-Forwarded-Proto", "http"), ("x-forwarded-proto", "x")], "https", id="repeats-collapsed"),
    ],
)
def test_upstream_x_forwarded_proto(items: list[tuple[str, str]], scheme: str) -> None:
    out = _upstream(("Host", "h"), *items, scheme=scheme)
    assert out.getall("X-Forwarded-Proto") == [scheme]


@pytest.mark.parametrize(
    "items",
    [
        pytest.param([], id="absent"),
        pytest.param([("X-Request-Id", "client-id")], id="client-value-replaced"),
        pytest.param([("x-request-id", "a"), ("X-Request-ID", "b")], id="repeats-collapsed"),
    ],
)
def test_upstream_x_request_id(items: list[tuple[str, str]]) -> None:
    out = _upstream(("Host", "h"), *items, request_id="chosen")
    assert out.getall("X-Request-Id") == ["chosen"]


def test_upstream_forwarding_headers_named_in_connection() -> None:
    out = _upstream(
        ("Host", "h"),
        ("Connection", "x-forwarded-for, x-request-id, x-forwarded-host"),
        ("X-Forwarded-For", "1.1.1.1"),
        ("X-Forwarded-Host", "claimed"),
        ("X-Request-Id", "client"),
    )
    # The client's values were for this hop only and are dropped; the gateway's own hop is always recorded.
    assert out.getall("X-Forwarded-For") == ["10.1.2.3"]
    assert out.getall("X-Forwarded-Host") == ["h"]
    assert out.getall("X-Request-Id") == ["rid-1"]


# --------------------------------------------------------------------------------------------------------------------
# downstream_response_headers
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*sorted(HOP_BY_HOP), "Content-Length", "content-length", "Keep-Alive"])
def test_downstream_drops(name: str) -> None:
    out = downstream_response_headers(_proxy((name, "x"), ("Content-Type", "text/plain")))
    assert name not in out
    assert out["Content-Type"] == "text/plain"


def test_downstream_keeps_end_to_end_headers() -> None:
    items = [
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Cache-Control", "no-store"),
        ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ("Server", "upstream"),
        ("X-Decision-Id", "d"),
    ]
    out = downstream_response_headers(_proxy(*items, ("Content-Length", "10"), ("Connection", "keep-alive")))
    assert list(out.items()) == items


def test_downstream_drops_connection_named_headers() -> None:
    out = downstream_response_headers(_proxy(("Connection", "close, X-Internal"), ("X-Internal", "1"), ("ETag", "e")))
    assert list(out.items()) == [("ETag", "e")]


# --------------------------------------------------------------------------------------------------------------------
# request ids
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        pytest.param("abc", True, id="short"),
        pytest.param("d8c14423-f3e5-411e-a70f-9c80e9b5eae3", True, id="uuid"),
        pytest.param("Root=1-5f84c7a1-abc;Self=2", False, id="semicolon-and-equals"),
        pytest.param("svc.orders:42_a-b", True, id="all-allowed-marks"),
        pytest.param("x" * 128, True, id="128-chars"),
        pytest.param("x" * 129, False, id="129-chars"),
        pytest.param("", False, id="empty"),
        pytest.param("abc\n", False, id="trailing-newline"),
        pytest.param("abc\r\nx-admin: 1", False, id="header-injection"),
        pytest.param('abc" level="error', False, id="log-injection-quotes"),
        pytest.param("a b", False, id="space"),
        pytest.param("<script>", False, id="markup"),
        pytest.param("caf\u00e9", False, id="non-ascii"),
        pytest.param("\uff11\uff12", False, id="fullwidth-digits"),
    ],
)
def test_request_id_from(value: str, kept: bool) -> None:
    headers = _proxy(("X-Request-Id", value))
    assert request_id_from(headers, lambda: "generated") == (value if kept else "generated")


def test_request_id_from_generates_when_absent() -> None:
    assert request_id_from(_proxy(("Host", "h")), lambda: "generated") == "generated"


def test_request_id_from_header_name_is_case_insensitive() -> None:
    assert request_id_from(_proxy(("x-REQUEST-id", "abc")), lambda: "generated") == "abc"


def test_new_request_id_is_a_canonical_uuid4() -> None:
    ids = {new_request_id() for _ in range(2000)}
    assert len(ids) == 2000
    for rid in ids:
        parsed = uuid.UUID(rid)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == rid
        assert request_id_from(_proxy(("X-Request-Id", rid)), lambda: "generated") == rid


# --------------------------------------------------------------------------------------------------------------------
# client address
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peername", "expected"),
    [
        pytest.param(("10.0.0.1", 51234), ("10.0.0.1", 51234), id="ipv4"),
        pytest.param(("2001:db8::1", 443, 0, 0), ("2001:db8::1", 443), id="ipv6-4-tuple"),
        pytest.param(("::1", 80, 0, 0), ("::1", 80), id="ipv6-loopback"),
        pytest.param(("::ffff:10.0.0.1", 80, 0, 0), ("10.0.0.1", 80), id="ipv4-mapped-ipv6"),
        pytest.param(("::ffff:a00:1", 80, 0, 0), ("::ffff:a00:1", 80), id="mapped-hex-form-kept"),
        pytest.param(("fe80::1%eth0", 80, 0, 2), ("fe80::1%eth0", 80), id="link-local-scope-kept"),
        pytest.param(None, (UNKNOWN_CLIENT, 0), id="none"),
        pytest.param("/run/meshgate.sock", (UNKNOWN_CLIENT, 0), id="unix-socket-path"),
        pytest.param("", (UNKNOWN_CLIENT, 0), id="unnamed-unix-socket"),
        pytest.param(b"\x00abstract", (UNKNOWN_CLIENT, 0), id="abstract-unix-socket"),
        pytest.param(("", 0), (UNKNOWN_CLIENT, 0), id="empty-host"),
        pytest.param(("10.0.0.1",), (UNKNOWN_CLIENT, 0), id="short-tuple"),
    ],
)
def test_client_ip_and_port(peername: object, expected: tuple[str, int]) -> None:
    assert client_ip_and_port(peername) == expected
