"""Log lines are JSON with the contract's fields, go through the log writer, and secrets never reach them."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from yarl import URL

from telemetry import logging as tlogging
from telemetry.log_writer import LogWriter
from telemetry.logging import MAX_DEPTH, REDACTED, TRUNCATED, configure, redact, redact_text

R = REDACTED


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        # Secret keys, any case, at the top level.
        ({"authorization": "Bearer x"}, {"authorization": R}),
        ({"Cookie": "a=b"}, {"Cookie": R}),
        ({"Set-Cookie": ["a=b", "c=d"]}, {"Set-Cookie": R}),
        ({"Proxy-Authorization": "Basic eA=="}, {"Proxy-Authorization": R}),
        ({"token": "t", "status": 200}, {"token": R, "status": 200}),
        ({"refresh_token": "t", "password": "p", "client_secret": "s"},
         {"refresh_token": R, "password": R, "client_secret": R}),
        # ...and by suffix.
        ({"x-auth-token": "t", "X-Goog-Api-Key": "k", "db_password": "p"},
         {"x-auth-token": R, "X-Goog-Api-Key": R, "db_password": R}),
        # Generic words are not secret keys (they are as query parameters, below).
        ({"key": "orders:alice", "code": 404, "tokens": 3.5}, {"key": "orders:alice", "code": 404, "tokens": 3.5}),
        # Nested, at any depth, in mappings and lists of mappings; values of other types kept as they are.
        (
            {"headers": {"Authorization": "x", "accept": "*/*"}},
            {"headers": {"Authorization": R, "accept": "*/*"}},
        ),
        (
            {"input": {"attributes": {"request": {"http": {"headers": {"cookie": "s=1", "x-ok": "1"}}}}}},
            {"input": {"attributes": {"request": {"http": {"headers": {"cookie": R, "x-ok": "1"}}}}}},
        ),
        (
            {"attempts": [{"endpoint": "a", "token": "t"}, {"endpoint": "b", "retry": True, "n": None}]},
            {"attempts": [{"endpoint": "a", "token": R}, {"endpoint": "b", "retry": True, "n": None}]},
        ),
        # (name, value) pairs, as in a list of header tuples.
        (
            {"headers": [("Authorization", "Basic eA=="), ("Accept", "*/*")]},
            {"headers": [["Authorization", R], ["Accept", "*/*"]]},
        ),
        # Query strings under URL-ish keys.
        ({"url": "http://h/p?token=abc&x=1"}, {"url": f"http://h/p?token={R}&x=1"}),
        ({"path": "/cb?code=xyz&state=ok"}, {"path": f"/cb?code={R}&state=ok"}),
        ({"query": "a=1&access_token=abc"}, {"query": f"a=1&access_token={R}"}),  # bare: no "?" needed
        ({"query": "api_key=abc"}, {"query": f"api_key={R}"}),
        ({"location": "/next?sig=abc#id_token=def"}, {"location": f"/next?sig={R}#id_token={R}"}),
        ({"referer": "https://h/?KEY=abc"}, {"referer": f"https://h/?KEY={R}"}),
        ({"target": "/x?X-Amz-Signature=abc&X-Amz-Credential=def&X-Amz-Date=1"},
         {"target": f"/x?X-Amz-Signature={R}&X-Amz-Credential={R}&X-Amz-Date=1"}),
        ({"jwks_url": "https://idp/keys?apikey=abc"}, {"jwks_url": f"https://idp/keys?apikey={R}"}),
        ({"location": ["/a?token=1", "/b?token=2"]}, {"location": [f"/a?token={R}", f"/b?token={R}"]}),
        ({"url": URL("http://h/p?password=abc")}, {"url": f"http://h/p?password={R}"}),  # rendered with str()
        # Query strings in any string that has a "?".
        ({"event": "fetch failed: GET /x?secret=abc"}, {"event": f"fetch failed: GET /x?secret={R}"}),
        ({"error": "bad url '/x?token=abc'"}, {"error": f"bad url '/x?token={R}'"}),
        # Bearer tokens, URL passwords and credential header lines inside any string.
        ({"detail": "sent Bearer abc.def-ghi"}, {"detail": f"sent Bearer {R}"}),
        ({"detail": "header authorization: bearer abc, retrying"}, {"detail": f"header authorization: {R}"}),
        (
            {"exception": "ClientError: {'Authorization': 'Digest a=\"b\", response=\"c\"'}\nnext line"},
            {"exception": f"ClientError: {{'Authorization': {R}\nnext line"},
        ),
        ({"event": "missing Bearer token"}, {"event": "missing Bearer token"}),
        ({"redis": "redis://user:pa55@cache:6379/0"}, {"redis": f"redis://user:{R}@cache:6379/0"}),
        ({"detail": "Invalid header: Cookie: session=abc"}, {"detail": f"Invalid header: Cookie: {R}"}),
        # Nothing secret: untouched.
        ({"path": "/x", "status": 200, "ok": True}, {"path": "/x", "status": 200, "ok": True}),
        ({"url": "http://h/p?page=2&sort=name"}, {"url": "http://h/p?page=2&sort=name"}),
        ({"event": "what now?", "detail": "keyboard=qwerty?"}, {"event": "what now?", "detail": "keyboard=qwerty?"}),
    ],
    ids=[
        "authorization", "cookie-any-case", "set-cookie-list", "proxy-authorization", "token", "more-secret-keys",
        "secret-key-suffixes", "generic-words-kept",
        "nested-headers", "deeply-nested", "list-of-dicts", "header-pairs",
        "url", "path-code", "bare-query", "bare-query-first", "fragment-and-sig", "param-any-case", "aws-presigned",
        "url-suffix-key", "list-of-urls", "url-object",
        "any-string-with-query", "quoted-url",
        "bearer", "header-line-to-end-of-line", "headers-repr", "bearer-word-kept", "url-password",
        "cookie-header-line",
        "nothing-secret", "harmless-query", "harmless-question",
    ],
)  # fmt: skip
def test_redact(event: dict[str, Any], expected: dict[str, Any]) -> None:
    assert redact(None, "info", dict(event)) == expected


@pytest.mark.parametrize(
    ("text", "url", "expected"),
    [
        ("token=abc", True, f"token={R}"),
        ("token=abc", False, "token=abc"),  # a bare "name=value" in prose is not a query string
        ("/p?a=1;session=abc", False, f"/p?a=1;session={R}"),
        ("/p?Access_Token=abc&b=2", False, f"/p?Access_Token={R}&b=2"),
        ("/p?token=", False, f"/p?token={R}"),
        ("/p?token=a%20b c", False, f"/p?token={R} c"),
        ("/p?notatoken=1&mytoken=2", False, f"/p?notatoken={R}&mytoken={R}"),  # suffix rule: over, never under
        ("/p?monkey=1&codec=2", False, "/p?monkey=1&codec=2"),  # exact names only for the generic ones
        ("Authorization: Bearer abc", False, f"Authorization: {R}"),
        ("BEARER abc==", False, f"BEARER {R}"),
    ],
)
def test_redact_text(text: str, url: bool, expected: str) -> None:
    assert redact_text(text, url=url) == expected


def test_redact_does_not_modify_what_the_caller_passed() -> None:
    headers = {"authorization": "Bearer x", "inner": {"cookie": "c"}}
    pairs = [("cookie", "c")]
    redact(None, "info", {"headers": headers, "pairs": pairs})
    assert headers == {"authorization": "Bearer x", "inner": {"cookie": "c"}}
    assert pairs == [("cookie", "c")]


def test_redact_stops_at_the_depth_bound() -> None:
    nested: dict[str, Any] = {"token": "t"}
    for _ in range(MAX_DEPTH + 2):
        nested = {"n": nested}
    out = redact(None, "info", {"deep": nested})["deep"]
    for _ in range(MAX_DEPTH - 1):
        out = out["n"]
    assert out == {"n": TRUNCATED}  # not walked, and not written unchecked either


def test_redact_handles_self_reference() -> None:
    loop: dict[str, Any] = {"token": "t"}
    loop["self"] = loop
    out = redact(None, "info", {"loop": loop})["loop"]
    assert out["token"] == R
    assert json.dumps(out)  # bounded: no recursion error, renderable


@pytest.fixture
def out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LogWriter, Path]]:
    """A writer over a file, configured in; structlog, the root logger and the module's writer restored after."""
    path = tmp_path / "out.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    writer = LogWriter(fd)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(tlogging, "_writer", None)
    yield writer, path
    writer.close(1.0)
    os.close(fd)
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def lines(writer: LogWriter, path: Path) -> list[dict[str, Any]]:
    assert writer.flush(2.0)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lines_are_json_with_contract_fields(out: tuple[LogWriter, Path]) -> None:
    writer, path = out
    configure("info", "orders", writer=writer)
    structlog.contextvars.bind_contextvars(request_id="r-1")
    structlog.get_logger("t").info("request", status=200, authorization="Bearer secret")
    structlog.get_logger("t").debug("hidden")  # below the level: not written
    [line] = lines(writer, path)
    assert line["event"] == "request"
    assert line["level"] == "info"
    assert line["service"] == "orders"
    assert line["request_id"] == "r-1"
    assert line["authorization"] == REDACTED
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line["timestamp"])
    assert writer.service == "orders"  # for the writer's own log_lines_dropped line


def test_bound_context_reaches_every_line(out: tuple[LogWriter, Path]) -> None:
    writer, path = out
    configure("info", "orders", writer=writer)
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    structlog.contextvars.bind_contextvars(request_id="r-2", trace_id=trace_id, span_id=span_id)
    structlog.get_logger("t").warning("upstream_body_failed", upstream="c")
    logging.getLogger("aiohttp.server").error("from the stdlib")
    records = lines(writer, path)
    assert [(r["event"], r["request_id"], r["trace_id"], r["span_id"]) for r in records] == [
        ("upstream_body_failed", "r-2", trace_id, span_id),
        ("from the stdlib", "r-2", trace_id, span_id),
    ]
    assert records[1]["logger"] == "aiohttp.server"


def test_a_reload_changes_the_level_and_keeps_the_writer(out: tuple[LogWriter, Path]) -> None:
    writer, path = out
    log = structlog.get_logger("meshgate.test")  # module-level loggers are made once, before any configure
    configure("info", "orders", writer=writer)
    log.debug("hidden")
    log.info("one")
    logging.getLogger("x").debug("hidden too")
    configure("debug", "orders", writer=writer)  # what app.publish does when telemetry.logs.level changes
    log.debug("two")
    logging.getLogger("x").debug("three")
    configure("warning", "orders", writer=writer)
    log.info("hidden again")
    log.warning("four")
    assert [r["event"] for r in lines(writer, path)] == ["one", "two", "three", "four"]


def test_stdlib_records_with_a_custom_level_are_logged(out: tuple[LogWriter, Path]) -> None:
    writer, path = out
    configure("info", "orders", writer=writer)
    logging.getLogger("x").log(25, "between info and warning")
    [line] = lines(writer, path)
    assert (line["event"], line["level"]) == ("between info and warning", "info")


def test_tracebacks_are_redacted_too(out: tuple[LogWriter, Path]) -> None:
    writer, path = out
    configure("info", "orders", writer=writer)
    try:
        raise ValueError("cannot fetch https://idp/x?access_token=s3cr3t (Authorization: Bearer s3cr3t)")
    except ValueError:
        structlog.get_logger("t").exception("failed")
    [line] = lines(writer, path)
    assert "ValueError" in line["exception"]
    assert "s3cr3t" not in path.read_text()


def test_flush_waits_for_the_configured_writer(out: tuple[LogWriter, Path]) -> None:
    writer, path = out
    configure("info", "orders", writer=writer)
    structlog.get_logger("t").info("last")
    assert tlogging.flush(2.0)
    assert '"event":"last"' in path.read_text()  # written by the time flush returns: no sleep, no poll
