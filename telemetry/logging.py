"""structlog JSON logging: one object per line on stdout, with the fields the contract promises, and no secrets.

Every line carries ``timestamp`` (ISO 8601 UTC), ``level``, ``event`` and ``service``; values bound with
``structlog.contextvars`` (request id, trace ids) are merged in first, so nothing bound in a request is lost.
Records from the standard ``logging`` module (aiohttp's own loggers) are routed through the same pipeline. Rendered
lines go to the process-wide ``LogWriter`` (``telemetry.log_writer``), never straight to stdout: a stdout nobody
reads must not stall the event loop.

Secrets are removed in ``redact``, the one processor every line passes through (after tracebacks are rendered, so
those are covered too), so no call site can leak them by accident:

- a value whose key is secret-bearing (``SECRET_KEYS``, or a key ending in one of ``SECRET_SUFFIXES``, any case)
  is replaced whole, at any depth of nested mappings, lists and ``(name, value)`` pairs (``MAX_DEPTH`` levels;
  deeper containers become ``TRUNCATED`` rather than go out unchecked);
- in strings, the values of secret query parameters (``SECRET_PARAMS`` and names ending in ``SECRET_SUFFIXES``,
  any case, after ``?``, ``&``, ``;`` or ``#``) are masked. Values under URL-ish keys (``URL_KEYS``, ``*_url``,
  ``*_uri``) are treated as URLs or query strings throughout, so a bare ``query="token=x"`` is masked too;
- in any string, ``Bearer <token>``, the password of ``scheme://user:password@`` and everything after
  ``Authorization:`` / ``Cookie:`` (or ``=``) to the end of the line (a raw header dump, a parser error, a headers
  mapping's repr in an exception message) are masked.

Values that are not JSON-native (URL objects, paths, enums) are rendered with ``str()``, as the JSON renderer would,
and then checked like strings.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

from telemetry.log_writer import CLOSE_TIMEOUT, LogWriter, default_writer

__all__ = [
    "MAX_DEPTH",
    "REDACTED",
    "SECRET_KEYS",
    "SECRET_PARAMS",
    "SECRET_SUFFIXES",
    "TRUNCATED",
    "URL_KEYS",
    "configure",
    "flush",
    "redact",
    "redact_text",
    "secret_param",
]

REDACTED = "<redacted>"
TRUNCATED = "<truncated>"
# Containers nested deeper than this are not walked (a bound on the work per line, and on self-referencing data).
MAX_DEPTH = 8

# Lower-case keys whose values never reach a log line, wherever they appear in an event.
SECRET_KEYS = frozenset(
    {
        "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key",
        "token", "access_token", "id_token", "refresh_token", "password", "secret", "client_secret",
    }
)  # fmt: skip
# A key or query parameter ending in one of these is secret too: x-auth-token, client_secret, X-Amz-Signature,
# X-Amz-Credential, db_password, x-goog-api-key.
SECRET_SUFFIXES = ("token", "secret", "password", "passwd", "signature", "credential", "apikey", "api_key", "api-key")
# Query parameters that carry credentials in the wild but are too generic to be secret as event keys: "key" (Google
# API keys), "sig" (Azure SAS), "code" (OAuth authorization code), "auth"/"jwt"/"session" (ad-hoc tokens).
SECRET_PARAMS = frozenset({"key", "sig", "code", "auth", "jwt", "pwd", "session", "sessionid", "sid"})
# Keys whose string values are URLs, paths or query strings.
URL_KEYS = frozenset(
    {"url", "uri", "href", "query", "query_string", "target", "path", "raw_path", "location", "referer", "referrer"}
)

_PARAM_NAME = (
    r"(?:[^=&;?#\s\"']*?(?:" + "|".join(re.escape(s) for s in SECRET_SUFFIXES) + r")"
    r"|" + "|".join(sorted(SECRET_PARAMS)) + r")"
)
# group 1: the separator (or start of a bare query string) and the name with its "="; the value runs to the next
# separator, whitespace or quote.
_QUERY_SECRET = re.compile(r"(?i)((?:^|[?&;#])" + _PARAM_NAME + r"=)[^&;#\s\"']*")
# "Bearer" followed by an RFC 6750 token; the bare words "Bearer token(s)" in a message are left alone.
_BEARER = re.compile(r"(?i)\b(bearer)\s+(?!tokens?\b)[A-Za-z0-9\-._~+/]+=*")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^/\s:@?#]*:)[^@/\s?#]*@")
# To the end of the line: a credential may hold commas and quotes (Digest). The optional quote after the name
# covers a headers mapping's repr in an exception message: {'Authorization': '...'}.
_HEADER_LINE = re.compile(r"(?i)\b((?:proxy-)?authorization|(?:set-)?cookie)(['\"]?\s*[:=]\s*)[^\r\n]+")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_NATIVE = (bool, int, float, type(None))  # as a tuple: for both isinstance and "type in"

_writer: LogWriter | None = None


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secrets in every value of ``event`` (see the module docstring for the rules).

    ``event`` is structlog's own per-call dict and is updated in place; nested containers the caller passed in
    (a headers dict, say) are copied, never modified.
    """
    for key, value in event.items():
        # Replacing values of existing keys while iterating is safe: the dict's size does not change. The common
        # cases (a plain key with a str or number value) are inlined: this runs for every field of every line.
        kind = _key_kinds.get(key) or _key_kind(key)
        if kind is _SECRET:
            event[key] = REDACTED
        elif type(value) is str:
            event[key] = redact_text(value, url=kind is _URL)
        elif type(value) not in _NATIVE:
            event[key] = _redact_value(key, value, 0)
    return event


def secret_param(name: str) -> bool:
    """Whether a query parameter of this name has its value masked in a URL (as ``redact_text`` does), for callers
    that log a query already parsed into a mapping, where the generic key rules would miss ``code`` or ``sig``."""
    lowered = name.lower()
    return lowered in SECRET_PARAMS or lowered.endswith(SECRET_SUFFIXES)


def redact_text(text: str, *, url: bool = False) -> str:
    """``text`` with secret query values, bearer tokens, URL passwords and credential header lines masked.

    ``url=True`` treats ``text`` as a URL, path or query string even without a ``?`` (a bare ``a=1&token=x``).
    """
    # Substring tests first: most values (ids, names, addresses) contain none of the markers, and a regex scan
    # of every string value made redaction the larger part of a line's cost.
    lowered = text.lower()
    if "=" in text and (url or "?" in text or "#" in text):
        text = _QUERY_SECRET.sub(_mask_param, text)
    if "://" in text and "@" in text:
        text = _USERINFO.sub(_mask_userinfo, text)
    if "bearer" in lowered:
        text = _BEARER.sub(_mask_bearer, text)
    if "authorization" in lowered or "cookie" in lowered:
        text = _HEADER_LINE.sub(_mask_header, text)
    return text


def _redact_value(key: str, value: Any, depth: int) -> Any:
    kind = _key_kind(key)
    if kind is _SECRET:
        return REDACTED
    # Exact-type checks first: nearly every value is a plain str or number, and ABC isinstance checks are slow.
    cls = type(value)
    if cls is str:
        return redact_text(value, url=kind is _URL)
    if cls in _NATIVE:
        return value
    if isinstance(value, str):
        return redact_text(value, url=kind is _URL)
    if isinstance(value, dict | Mapping):
        if depth >= MAX_DEPTH:
            return TRUNCATED
        return {k: _redact_value(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        if depth >= MAX_DEPTH:
            return TRUNCATED
        items = list(value)
        # A (name, value) pair, as in a list of header tuples: a secret name hides the value, as a key would.
        if len(items) == 2 and isinstance(items[0], str) and _key_kind(items[0]) is _SECRET:
            return [items[0], REDACTED]
        # Items are judged under the container's key: a list under "location" holds URLs.
        return [_redact_value(key, item, depth + 1) for item in items]
    if isinstance(value, _NATIVE):  # bool/int/float subclasses (enums): the renderer writes them as numbers
        return value
    # What the JSON renderer would do with it (str()), checked like any other string: a yarl.URL keeps its query.
    return redact_text(str(value), url=kind is _URL)


_PLAIN, _SECRET, _URL = "plain", "secret", "url"
# Key -> kind. Event keys come from code (a small set), but nested keys may come from requests (header names), so
# the cache stops growing at a bound and later keys are classified each time.
_key_kinds: dict[str, str] = {}
_KEY_CACHE_SIZE = 4096


def _key_kind(key: str) -> str:
    kind = _key_kinds.get(key)
    if kind is None:
        lowered = key.lower()
        if lowered in SECRET_KEYS or lowered.endswith(SECRET_SUFFIXES):
            kind = _SECRET
        elif lowered in URL_KEYS or lowered.endswith(("_url", "_uri", "-url", "-uri")):
            kind = _URL
        else:
            kind = _PLAIN
        if len(_key_kinds) < _KEY_CACHE_SIZE:
            _key_kinds[key] = kind
    return kind


def _mask_param(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED


def _mask_userinfo(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED + "@"


def _mask_bearer(match: re.Match[str]) -> str:
    return f"{match.group(1)} {REDACTED}"


def _mask_header(match: re.Match[str]) -> str:
    return match.group(1) + match.group(2) + REDACTED


def configure(level: str = "info", service: str = "meshgate", *, writer: LogWriter | None = None) -> None:
    """(Re)configure structlog and the stdlib root logger to write through ``writer`` (default: the process-wide
    one). Safe to call again on a reload: the level changes, the writer and its queued lines stay."""
    global _writer
    _writer = writer if writer is not None else default_writer()
    _writer.service = service  # for the writer's own log_lines_dropped line

    def add_service(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("service", service)
        return event

    structlog.configure(
        processors=[
            # First: the request's bound context (request id, trace ids) is part of every line logged inside it.
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            add_service,
            # Before redact: a traceback's text (an exception message quoting a URL) is checked too.
            structlog.processors.format_exc_info,
            redact,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=_WriterLoggerFactory(_writer),
        # Not cached: a reload may change the level, and bound loggers must pick that up.
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers[:] = [_StructlogHandler()]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # The data plane renders and logs protocol errors itself (server.py), so what still reaches "aiohttp.server"
    # is a real failure (e.g. an admin handler crash) and must stay visible. Access lines are meshgate's own.
    logging.getLogger("aiohttp.access").setLevel(logging.CRITICAL)


def flush(timeout: float = CLOSE_TIMEOUT) -> bool:
    """Wait (at most ``timeout`` s, blocking) until the lines logged so far are written; True if they all were.

    For shutdown: the writer thread writes on its own otherwise, and the process-wide writer also drains
    (bounded) at interpreter exit.
    """
    return (_writer if _writer is not None else default_writer()).flush(timeout)


def _dumps(obj: Any, **_kwargs: Any) -> str:
    # structlog passes its own `default`; str() is enough for what the gateway logs (addresses, enums, paths).
    return json.dumps(obj, default=str, separators=(",", ":"))


class _WriterLogger:
    """The structlog "logger" at the end of the chain: hands the rendered line to the writer, whatever the level
    (filtering happened in the bound logger)."""

    __slots__ = ("_writer",)

    def __init__(self, writer: LogWriter) -> None:
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.write(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


class _WriterLoggerFactory:
    """structlog calls the factory on every log call (loggers are not cached): hand out the one logger."""

    __slots__ = ("_logger",)

    def __init__(self, writer: LogWriter) -> None:
        self._logger = _WriterLogger(writer)

    def __call__(self, *_args: Any) -> _WriterLogger:
        return self._logger


class _StructlogHandler(logging.Handler):
    """Send stdlib log records through structlog so they come out as the same JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger(record.name)
        fields: dict[str, Any] = {"logger": record.name}
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        log.log(_standard_level(record.levelno), record.getMessage(), **fields)


def _standard_level(levelno: int) -> int:
    # structlog knows only the standard levels; a custom one (e.g. 25) is logged at the standard one below it.
    for standard in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= standard:
            return standard
    return logging.DEBUG
