"""The ``config_service`` section of a bootstrap file: where a gateway gets the rest of its config.

Pure, like the rest of the compiler. Paths (``token_file``, ``cache_dir``) are kept as written; the file reader
resolves them against the bootstrap file's directory. The default ``gateway_id`` needs the host name, which is I/O:
it is left ``None`` here and filled in by the remote source.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from gateway.config.schema import Fields, Problems, duration, matching, not_above, string
from gateway.config.snapshot import ConfigService
from gateway.config.values import quote

__all__ = ["CONFIG_SERVICE_KEYS", "GATEWAY_ID", "MAX_POLL_WAIT", "compile_config_service"]

CONFIG_SERVICE_KEYS = ("url", "token_file", "cache_dir", "gateway_id", "poll_wait", "bundle_refresh")
# The service caps a long-poll's wait at 60 s: asking for more would only look like a hung connection.
MAX_POLL_WAIT = 60.0
_DEFAULT = ConfigService(url="", token_file="")

# Sent as the X-Meshgate-Gateway header and listed by GET /v1/gateways: a header-safe, log-safe alphabet. The config
# service checks the header against the same pattern (it becomes a metric label and a store key).
GATEWAY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_gateway_id = matching(GATEWAY_ID, "gateway id", 'use letters, digits, ".", "_", ":", "-"; at most 128')


def compile_config_service(top: Fields) -> ConfigService | None:
    """The section, or ``None`` when absent or invalid (its problems recorded)."""
    fields = top.section("config_service", CONFIG_SERVICE_KEYS)
    if fields is None:
        return None
    mark = fields.problems.mark()
    raw_url = fields.required("url", string)
    url = _url(raw_url, fields.at("url"), fields.problems) if raw_url is not None else None
    token_file = fields.required("token_file", _non_empty)
    cache_dir = fields.get("cache_dir", _non_empty, _DEFAULT.cache_dir)
    gateway_id = fields.optional("gateway_id", _gateway_id)
    poll_wait = fields.get("poll_wait", duration(positive=True), _DEFAULT.poll_wait)
    not_above(fields.at("poll_wait"), poll_wait, "the service's limit", MAX_POLL_WAIT, fields.problems)
    bundle_refresh = fields.get("bundle_refresh", duration(positive=True), _DEFAULT.bundle_refresh)
    if url is None or token_file is None or fields.problems.since(mark):
        return None
    return ConfigService(url, token_file, cache_dir, gateway_id, poll_wait, bundle_refresh)


def _non_empty(value: object, path: str, problems: Problems) -> str | None:
    text = string(value, path, problems)
    if text is not None and not text:
        problems.add(path, "must not be empty")
        return None
    return text


def _url(text: str, path: str, problems: Problems) -> str | None:
    """An ``http(s)://host[:port][/prefix]`` base URL, returned without a trailing slash."""
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError for a port that is not a number or out of range
    except ValueError:
        problems.add(path, f"invalid URL {quote(text)}")
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.add(path, f"invalid URL {quote(text)} (expected http://host:port or https://host:port)")
        return None
    if parts.query or parts.fragment or parts.username or parts.password:
        problems.add(path, f"invalid URL {quote(text)} (no query, fragment or credentials: use token_file)")
        return None
    del port
    return text.rstrip("/")
