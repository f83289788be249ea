"""Log lines are JSON with the contract's fields, and secrets never reach them."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest
import structlog

from telemetry.logging import REDACTED, configure, redact


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"authorization": "Bearer x"}, {"authorization": REDACTED}),
        ({"Cookie": "a=b"}, {"Cookie": REDACTED}),
        (
            {"headers": {"Authorization": "x", "accept": "*/*"}},
            {"headers": {"Authorization": REDACTED, "accept": "*/*"}},
        ),
        ({"token": "t", "path": "/x"}, {"token": REDACTED, "path": "/x"}),
        ({"path": "/x"}, {"path": "/x"}),
    ],
    ids=["authorization", "cookie-any-case", "nested-headers", "token", "nothing-secret"],
)
def test_redact(event: dict[str, object], expected: dict[str, object]) -> None:
    assert redact(None, "info", dict(event)) == expected


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.mark.usefixtures("restore_root_logging")
def test_lines_are_json_with_contract_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "orders")
    structlog.contextvars.bind_contextvars(request_id="r-1")
    try:
        structlog.get_logger("t").info("request", status=200, authorization="Bearer secret")
        structlog.get_logger("t").debug("hidden")  # below the level: not written
    finally:
        structlog.contextvars.clear_contextvars()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["event"] == "request"
    assert line["level"] == "info"
    assert line["service"] == "orders"
    assert line["request_id"] == "r-1"
    assert line["authorization"] == REDACTED
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line["timestamp"])
