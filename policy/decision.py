"""Turn the decision rule's raw value into a ``Decision``, following opa-envoy-plugin's result rules (CONTRACT 5).

Pure. ``true``/``false`` are allow/deny; ``UNDEFINED`` is a deny; an object carries ``allowed`` plus how to answer.
As in opa-envoy-plugin, ``headers`` go to the upstream on an allow and into the local reply on a deny;
``response_headers_to_add`` are added to the client's response on an allow; ``http_status`` and ``body`` shape a
deny. Anything else (a string, an object without a boolean ``allowed``, a status outside 3xx-5xx) is a policy bug:
``InvalidResult``, which the gateway treats like an engine error, so it fails closed unless ``on_error: allow``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from policy.engine import Undefined

__all__ = ["ALLOW", "DENY", "UNDEFINED_DENY", "Decision", "InvalidResult", "parse_result"]

Headers = tuple[tuple[str, str], ...]


class InvalidResult(ValueError):
    """The rule produced a value that is neither a boolean nor a valid result object."""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    status: int = 403  # the deny reply's status
    headers: Headers = ()  # allow: added to the upstream request; deny: added to the reply
    response_headers_to_add: Headers = ()  # allow: added to the client's response
    request_headers_to_remove: tuple[str, ...] = ()  # allow: removed from the upstream request (lower-case)
    body: str | None = None  # deny: the reply body as given (None: meshgate's JSON reply)
    reason: str = ""
    defined: bool = True


ALLOW = Decision(True)
DENY = Decision(False)
UNDEFINED_DENY = Decision(False, reason="policy decision undefined", defined=False)


def parse_result(value: object) -> Decision:
    if isinstance(value, Undefined):
        return UNDEFINED_DENY
    if isinstance(value, bool):
        return ALLOW if value else DENY
    if not isinstance(value, Mapping):
        raise InvalidResult(f"expected a boolean or an object, got {_kind(value)}")
    allowed = value.get("allowed")
    if not isinstance(allowed, bool):
        raise InvalidResult(f'"allowed" must be a boolean, got {_kind(allowed)}')
    status = value.get("http_status", 403) if not allowed else 403  # only a deny is answered with it
    # bool is an int subclass: `http_status: true` is a policy bug, not status 1. 3xx is a deny too: opa-envoy
    # policies answer an unauthenticated browser with 302 and a `location` header (the login page).
    if isinstance(status, bool) or not isinstance(status, int) or not 300 <= status <= 599:
        raise InvalidResult(f'"http_status" must be an integer from 300 to 599, got {_kind(status)}')
    body = value.get("body")
    if body is not None and not isinstance(body, str):
        raise InvalidResult(f'"body" must be a string, got {_kind(body)}')
    reason = value.get("reason", "")
    if not isinstance(reason, str):
        raise InvalidResult(f'"reason" must be a string, got {_kind(reason)}')
    return Decision(
        allowed=allowed,
        status=status,
        headers=_headers(value, "headers"),
        response_headers_to_add=_headers(value, "response_headers_to_add"),
        request_headers_to_remove=_names(value),
        body=body,
        reason=reason,
    )


def _headers(result: Mapping[object, object], key: str) -> Headers:
    raw = result.get(key)
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise InvalidResult(f'"{key}" must be an object of header names to strings, got {_kind(raw)}')
    pairs: list[tuple[str, str]] = []
    for name, value in raw.items():
        if not isinstance(name, str) or not _token(name):
            raise InvalidResult(f'"{key}": invalid header name {name!r}')
        if isinstance(value, str):
            values = [value]
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            values = value  # opa-envoy-plugin accepts a list: one header line per item
        else:
            raise InvalidResult(f'"{key}.{name}" must be a string or a list of strings, got {_kind(value)}')
        for item in values:
            if "\r" in item or "\n" in item:
                raise InvalidResult(f'"{key}.{name}" must not contain line breaks')
            pairs.append((name, item))
    return tuple(pairs)


def _names(result: Mapping[object, object]) -> tuple[str, ...]:
    raw = result.get("request_headers_to_remove")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(name, str) and _token(name) for name in raw):
        raise InvalidResult('"request_headers_to_remove" must be a list of header names')
    return tuple(name.lower() for name in raw)


_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _token(name: str) -> bool:
    return bool(name) and all(char in _TCHAR for char in name)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
