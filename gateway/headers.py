"""Request-path normalization, header rewriting between client and upstream, request ids and the client address.

Pure functions on the per-request hot path: no I/O, no clock. Everything that can be decided once (escape tables,
header-name sets, regexes) is computed at import time, and the common case returns without allocating.

Path normalization (``normalize_path``) follows RFC 3986 section 6.2.2 and Envoy's ``normalize_path`` +
``merge_slashes`` + ``path_with_escaped_slashes_action``. The normalized path is the *only* path: routing, policy and
the upstream all see the same string, so no component can interpret a request differently from another (the classic
``/public/..%2fadmin`` bypass needs exactly that disagreement).

Steps, in order:

1. The path must start with ``/``. It must be printable ASCII without space or ``#``: control characters and NUL are
   rejected, and so is non-ASCII (aiohttp's parser already rejects it; the pure-Python parser might not). ``#`` is
   rejected because aiohttp keeps a fragment in ``raw_path``: ``/admin#x`` would dodge an exact-path policy while the
   upstream strips the fragment and serves ``/admin``.
2. Percent-escapes: ``%zz``, a truncated ``%4`` and ``%00`` are rejected. Escaped unreserved characters
   (``ALPHA DIGIT - . _ ~``) are decoded; every other escape is kept with upper-case hex. No other decoding happens
   (``%25`` stays ``%25``), so nothing is ever decoded twice and the function is idempotent.
3. Slashes: ``%2F`` and ``%5C`` per the ``escaped_slashes`` mode: ``unescape`` decodes both to ``/``; ``reject``
   refuses them; ``keep`` leaves them escaped (the operator accepts that an upstream which decodes them sees other
   segments than routing did). A raw ``\\`` is not a URI character and some servers treat it as ``/`` (Envoy's
   normalization does, following browsers): ``unescape`` and ``keep`` turn it into ``/``, ``reject`` refuses it.
4. Consecutive slashes are merged (``//admin`` -> ``/admin``). Merging comes before dot removal, so
   ``/a//../b`` is ``/b``, as a file system resolves it (Envoy, dot removal first, gives ``/a/b``).
5. Dot segments are removed (RFC 3986 section 5.2.4): ``..`` never climbs above the root (``/../a`` -> ``/a``); a
   path ending in ``/``, ``/.`` or ``/..`` keeps a trailing slash (``/a/b/..`` -> ``/a/``).

The query string is not part of the input: the caller splits it off first and appends it unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Final, Literal

from multidict import CIMultiDict, CIMultiDictProxy, istr

from gateway.errors import BadRequest

__all__ = [
    "EscapedSlashes",
    "HOP_BY_HOP",
    "UNKNOWN_CLIENT",
    "client_ip_and_port",
    "downstream_response_headers",
    "new_request_id",
    "normalize_path",
    "request_id_from",
    "upstream_request_headers",
]

EscapedSlashes = Literal["unescape", "reject", "keep"]

# --------------------------------------------------------------------------------------------------------------------
# Path normalization
# --------------------------------------------------------------------------------------------------------------------

# The fast path is a handful of C-level substring scans: measured ~3x faster than one regex with the same meaning,
# because sre steps through the "//" and "/." alternatives at every position. "/." is conservative (it also catches
# "/.well-known"); the slow path is correct for those, only a little slower.

_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX_DIGITS: Final = "0123456789abcdefABCDEF"

_MSG_BAD_ESCAPE: Final = "invalid percent-encoding in path"
_MSG_NUL: Final = "encoded NUL (%00) in path"
_MSG_ESCAPED_SLASH: Final = "escaped slash in path"
_MSG_BACKSLASH: Final = "backslash in path"
_MSG_BAD_CHAR: Final = "invalid character in path"
_MSG_NOT_ABSOLUTE: Final = "path must start with '/'"


def _escape_table(mode: EscapedSlashes) -> dict[str, str]:
    """Map every two-hex-digit pair (any case) to its replacement text; pairs refused in ``mode`` are absent.

    A dict lookup per escape replaces int parsing, case folding and branching on the slow path.
    """
    table: dict[str, str] = {}
    for hi in _HEX_DIGITS:
        for lo in _HEX_DIGITS:
            pair = hi + lo
            byte = int(pair, 16)
            if byte == 0:
                continue  # %00: always refused
            char = chr(byte)
            if char in _UNRESERVED:
                table[pair] = char
            elif char in "/\\":
                if mode == "unescape":
                    table[pair] = "/"
                elif mode == "keep":
                    table[pair] = "%" + pair.upper()
                # reject: absent
            else:
                table[pair] = "%" + pair.upper()
    return table


_ESCAPE_TABLES: Final[Mapping[str, dict[str, str]]] = {
    mode: _escape_table(mode) for mode in ("unescape", "reject", "keep")
}


def _escape_error(pair: str) -> str:
    """The message for an escape missing from a table (error path only)."""
    if len(pair) == 2 and all(c in _HEX_DIGITS for c in pair):
        byte = int(pair, 16)
        if byte == 0:
            return _MSG_NUL
        if byte in (0x2F, 0x5C):
            return _MSG_ESCAPED_SLASH
    return _MSG_BAD_ESCAPE


def normalize_path(raw_path: str, escaped_slashes: EscapedSlashes) -> str:
    """Return the canonical form of ``raw_path`` (percent-encoded, no query) or raise ``BadRequest``.

    See the module docstring for the rules. The result starts with ``/``, is printable ASCII, has no ``//`` and no
    dot segments, and ``normalize_path(normalize_path(p, m), m) == normalize_path(p, m)``. When nothing needs
    changing the very same string object is returned.
    """
    if not raw_path.startswith("/"):
        raise BadRequest(_MSG_NOT_ABSOLUTE)
    if (
        "%" not in raw_path
        and "//" not in raw_path
        and "/." not in raw_path
        and "\\" not in raw_path
        and "#" not in raw_path
        and " " not in raw_path
        and raw_path.isascii()  # O(1): CPython keeps an "all ASCII" flag on every str
        and raw_path.isprintable()  # rejects control characters (space is printable, hence the check above)
    ):
        return raw_path  # the common case: nothing to change, nothing allocated
    return _normalize_slow(raw_path, escaped_slashes)


def _normalize_slow(path: str, escaped_slashes: EscapedSlashes) -> str:
    if not (path.isascii() and path.isprintable()) or " " in path or "#" in path:
        raise BadRequest(_MSG_BAD_CHAR)

    if "\\" in path:
        if escaped_slashes == "reject":
            raise BadRequest(_MSG_BACKSLASH)
        path = path.replace("\\", "/")

    if "%" in path:
        table = _ESCAPE_TABLES[escaped_slashes]
        parts = path.split("%")
        out = [parts[0]]
        for part in parts[1:]:
            # part[:2] is shorter than 2 for a truncated escape ("%4" at the end, or "%" right before another "%"):
            # it is then never a key, which is what we want.
            replacement = table.get(part[:2])
            if replacement is None:
                raise BadRequest(_escape_error(part[:2]))
            out.append(replacement)
            out.append(part[2:])
        path = "".join(out)

    # Decoding may have produced "//" or "/." (from %2F or %2E), so look again after it.
    if "//" not in path and "/." not in path:
        return path
    return _remove_dot_segments(path)


def _remove_dot_segments(path: str) -> str:
    """Merge slashes and remove ``.``/``..`` segments of an absolute path (RFC 3986 5.2.4, merged slashes)."""
    segments = path.split("/")
    stack: list[str] = []
    for segment in segments[1:]:  # segments[0] is the empty string before the leading "/"
        if segment == "" or segment == ".":
            continue  # "" is an empty segment between two slashes: merging slashes drops it
        if segment == "..":
            if stack:
                stack.pop()  # at the root ".." has nothing to remove: "/../a" -> "/a"
            continue
        stack.append(segment)
    if not stack:
        return "/"
    result = "/" + "/".join(stack)
    # A path ending in "/", "/." or "/.." names a directory-like resource: keep its trailing slash.
    if segments[-1] in ("", ".", ".."):
        result += "/"
    return result


# --------------------------------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------------------------------

# RFC 9110 section 7.6.1 plus the de-facto ones (Keep-Alive, Proxy-Connection) and the proxy-auth pair, which is
# meant for this hop only. Lower-case; the istr copies below let multidict skip case folding on each lookup.
_HOP_BY_HOP_NAMES: Final = (
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
)
HOP_BY_HOP: Final[frozenset[str]] = frozenset(_HOP_BY_HOP_NAMES)

# Request: hop-by-hop, plus Expect (the gateway's own server answers "100-continue"; forwarding it would make the
# upstream answer a second time or wait for a body the gateway is already streaming). TE is dropped entirely, even
# "TE: trailers": the upstream hop is HTTP/1.1 and the gateway does not forward trailers.
_REQUEST_DROP: Final = tuple(istr(name) for name in (*_HOP_BY_HOP_NAMES, "expect"))
# Response: hop-by-hop (Transfer-Encoding among them) and Content-Length: aiohttp's server frames the response
# itself, and the caller sets content_length explicitly when it knows it.
_RESPONSE_DROP: Final = tuple(istr(name) for name in (*_HOP_BY_HOP_NAMES, "content-length"))

# A client may list header names in Connection to have them dropped at this hop (RFC 9110 7.6.1). It must not be
# able to drop these: removing Host or Content-Length would change how the upstream routes or frames the request.
_CONNECTION_PROTECTED: Final = frozenset({"host", "content-length"})
# Connection option tokens that are not header names in practice: skip them without work.
_CONNECTION_OPTIONS: Final = frozenset({"keep-alive", "close", "upgrade", "te"})
_COMMON_CONNECTION_VALUES: Final = frozenset({"keep-alive", "Keep-Alive", "close", "Close"})

_CONNECTION: Final = istr("connection")
_HOST: Final = istr("host")
_CONTENT_LENGTH: Final = istr("content-length")
_TRANSFER_ENCODING: Final = istr("transfer-encoding")
_X_FORWARDED_FOR: Final = istr("x-forwarded-for")
_X_FORWARDED_PROTO: Final = istr("x-forwarded-proto")
_X_FORWARDED_HOST: Final = istr("x-forwarded-host")
_X_REQUEST_ID: Final = istr("x-request-id")


def _connection_named(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> list[str]:
    """Header names the sender listed in Connection (lower-case, options like ``close`` left out)."""
    names: list[str] = []
    for value in headers.getall(_CONNECTION, ()):
        if value in _COMMON_CONNECTION_VALUES:
            continue  # nearly every request: skip the split/strip/lower
        for token in value.split(","):
            name = token.strip().lower()
            if name and name not in _CONNECTION_OPTIONS:
                names.append(name)
    return names


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    client_ip: str,
    scheme: str,
    request_id: str,
    host_override: str | None,
) -> CIMultiDict[str]:
    """The headers to send upstream for a client request with ``headers``.

    Copied unchanged except:

    - dropped: ``HOP_BY_HOP``, ``Expect``, and any header named in ``Connection`` (but never Host or Content-Length);
    - ``Content-Length`` is kept (the body is streamed with the same length), unless ``Transfer-Encoding`` was also
      sent: then the length is ambiguous (RFC 9112 6.3: Transfer-Encoding wins) and is dropped so the upstream can't
      frame the body differently from the gateway (request smuggling);
    - ``Host`` is kept, or replaced by ``host_override``;
    - ``x-forwarded-for``: the client-sent values (all of them, in order), then ``client_ip``, joined with ``", "``;
    - ``x-forwarded-proto``: overwritten with ``scheme`` (the gateway is the edge; it knows, the client only claims);
    - ``x-forwarded-host``: set to the client's Host when the client did not send one (kept otherwise);
    - a forwarding header the client named in ``Connection`` counts as not sent (the gateway's own hop is still
      recorded);
    - ``x-request-id``: overwritten with ``request_id`` (already validated by ``request_id_from``).
    """
    # Copy everything, then delete the few exceptions: the C-level copy beats filtering item by item in Python.
    out: CIMultiDict[str] = CIMultiDict(headers)
    if _CONNECTION in headers:
        for name in _connection_named(headers):
            if name not in _CONNECTION_PROTECTED:
                out.popall(name, None)
    for name in _REQUEST_DROP:
        if name in out:
            del out[name]
    if _TRANSFER_ENCODING in headers and _CONTENT_LENGTH in out:
        del out[_CONTENT_LENGTH]

    # Read from `out`, not `headers`: a forwarding header the client named in Connection was meant for this hop only.
    forwarded_for = out.getall(_X_FORWARDED_FOR, None)
    out[_X_FORWARDED_FOR] = ", ".join((*forwarded_for, client_ip)) if forwarded_for else client_ip
    out[_X_FORWARDED_PROTO] = scheme
    if _X_FORWARDED_HOST not in out:
        original_host = out.get(_HOST)
        if original_host is not None:
            out[_X_FORWARDED_HOST] = original_host
    if host_override is not None:
        out[_HOST] = host_override
    out[_X_REQUEST_ID] = request_id
    return out


def downstream_response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The headers to send the client for an upstream response with ``headers``.

    Dropped: ``HOP_BY_HOP`` (Connection, Keep-Alive, Proxy-Authenticate, Proxy-Authorization, Proxy-Connection, TE,
    Trailer, Transfer-Encoding, Upgrade), every header named in the upstream's ``Connection``, and
    ``Content-Length`` (the caller sets ``content_length`` when known; the server chooses the framing). Everything
    else, Content-Encoding included, is passed through: the body is relayed as bytes, never decoded.
    """
    out: CIMultiDict[str] = CIMultiDict(headers)
    if _CONNECTION in headers:
        for name in _connection_named(headers):
            out.popall(name, None)
    for name in _RESPONSE_DROP:
        if name in out:
            del out[name]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Request id and client address
# --------------------------------------------------------------------------------------------------------------------

# A client-sent id ends up in logs, spans and upstream headers: accept only a short, boring token so it can't inject
# log lines, markup or separators. fullmatch, not match with "$": "$" also matches before a trailing newline.
_SANE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_from(headers: Mapping[str, str], generate: Callable[[], str]) -> str:
    """The client's ``x-request-id`` if it is 1-128 characters of ``[A-Za-z0-9._:-]``, else ``generate()``."""
    value = headers.get(_X_REQUEST_ID)
    if value is not None and _SANE_REQUEST_ID.fullmatch(value) is not None:
        return value
    return generate()


# The RFC 4122 variant puts "10" in the top two bits of the 17th hex digit: map a random digit to 8, 9, a or b.
_UUID_VARIANT_DIGIT: Final = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def new_request_id() -> str:
    """A random UUIDv4 in canonical form (``xxxxxxxx-xxxx-4xxx-[89ab]xxx-xxxxxxxxxxxx``, lower-case hex).

    Same format and randomness as ``str(uuid.uuid4())`` at about a third of the cost (no ``UUID`` object, no int
    arithmetic). ``os.urandom`` rather than ``random``: ids are echoed to clients, so they must not reveal a
    predictable generator state, and forked workers must never repeat each other's sequence.
    """
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_UUID_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:]}"


# What a client address is called when the transport has none (a Unix socket, or a transport already closed).
UNKNOWN_CLIENT: Final = "unknown"
_IPV4_MAPPED_PREFIX: Final = "::ffff:"


def client_ip_and_port(peername: object) -> tuple[str, int]:
    """``(ip, port)`` from ``transport.get_extra_info("peername")``.

    IPv4 ``(host, port)`` and IPv6 ``(host, port, flowinfo, scope_id)`` tuples give their first two items; an
    IPv4-mapped IPv6 address from a dual-stack listener (``::ffff:10.0.0.1``) is reported as plain IPv4 so rate-limit
    keys, policy input and ``x-forwarded-for`` agree whichever socket family accepted the client. Anything else
    (``None``, a Unix socket path) gives ``(UNKNOWN_CLIENT, 0)``.
    """
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        if isinstance(host, str) and host and isinstance(port, int):
            if host.startswith(_IPV4_MAPPED_PREFIX) and "." in host:
                host = host[len(_IPV4_MAPPED_PREFIX) :]
            return host, port
    return UNKNOWN_CLIENT, 0
