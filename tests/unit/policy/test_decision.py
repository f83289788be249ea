"""parse_result: opa-envoy-plugin's result rules, and every malformed result refused with its message."""

from __future__ import annotations

import pytest

from policy.decision import ALLOW, DENY, UNDEFINED_DENY, Decision, InvalidResult, parse_result
from policy.engine import UNDEFINED


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, ALLOW),
        (False, DENY),
        (UNDEFINED, UNDEFINED_DENY),
        ({"allowed": True}, Decision(True)),
        ({"allowed": False}, Decision(False)),
        ({"allowed": False, "reason": "role admin required"}, Decision(False, reason="role admin required")),
        ({"allowed": False, "http_status": 401, "body": "no"}, Decision(False, status=401, body="no")),
        (
            {"allowed": False, "http_status": 302, "headers": {"location": "/login"}},
            Decision(False, status=302, headers=(("location", "/login"),)),
        ),
        # On an allow the status is meaningless (the upstream answers): ignored, as opa-envoy-plugin does.
        ({"allowed": True, "http_status": 200}, Decision(True)),
        (
            {"allowed": True, "headers": {"x-user": "alice", "x-multi": ["a", "b"]}},
            Decision(True, headers=(("x-user", "alice"), ("x-multi", "a"), ("x-multi", "b"))),
        ),
        (
            {"allowed": True, "response_headers_to_add": {"x-cache": "no"}, "request_headers_to_remove": ["Cookie"]},
            Decision(True, response_headers_to_add=(("x-cache", "no"),), request_headers_to_remove=("cookie",)),
        ),
    ],
)
def test_results(value: object, expected: Decision) -> None:
    assert parse_result(value) == expected


def test_undefined_is_a_deny_marked_undefined() -> None:
    decision = parse_result(UNDEFINED)
    assert not decision.allowed
    assert not decision.defined


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("allow", "expected a boolean or an object, got a string"),
        (1, "expected a boolean or an object, got the number 1"),
        (None, "expected a boolean or an object, got null"),
        ([True], "expected a boolean or an object, got a list"),
        ({}, '"allowed" must be a boolean, got null'),
        ({"allowed": "true"}, '"allowed" must be a boolean, got a string'),
        (
            {"allowed": False, "http_status": 200},
            '"http_status" must be an integer from 300 to 599, got the number 200',
        ),
        ({"allowed": False, "http_status": True}, '"http_status" must be an integer from 300 to 599, got a boolean'),
        ({"allowed": False, "http_status": "403"}, '"http_status" must be an integer from 300 to 599, got a string'),
        ({"allowed": False, "body": {"a": 1}}, '"body" must be a string, got an object'),
        ({"allowed": False, "reason": 5}, '"reason" must be a string, got the number 5'),
        ({"allowed": True, "headers": ["x"]}, '"headers" must be an object of header names to strings, got a list'),
        ({"allowed": True, "headers": {"bad name": "x"}}, "\"headers\": invalid header name 'bad name'"),
        ({"allowed": True, "headers": {"x": 1}}, '"headers.x" must be a string or a list of strings, got the number 1'),
        ({"allowed": True, "headers": {"x": "a\r\nSet-Cookie: y"}}, '"headers.x" must not contain line breaks'),
        ({"allowed": True, "request_headers_to_remove": "cookie"}, '"request_headers_to_remove" must be a list'),
    ],
)
def test_invalid_results(value: object, message: str) -> None:
    with pytest.raises(InvalidResult) as info:
        parse_result(value)
    assert str(info.value).startswith(message)
