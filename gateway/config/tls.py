"""Compile the TLS sections: the listener's top-level ``tls`` and each cluster's ``tls`` (TLS to its upstreams).

Pure: only the shape is checked here (which files are named, which combinations make sense). Whether the files
exist, parse and belong together is checked when a config is applied and by ``meshgate check``
(``gateway/tls/contexts.py``), with the same ``path: problem`` lines.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from gateway.config.schema import Fields, Problems, boolean, describe, string
from gateway.config.snapshot import ListenerTls, TlsVersion, UpstreamTls
from gateway.config.values import quote

__all__ = [
    "LISTENER_TLS_KEYS",
    "UPSTREAM_TLS_KEYS",
    "compile_listener_tls",
    "compile_upstream_tls",
    "moved_into_tls",
]

LISTENER_TLS_KEYS = ("cert_file", "key_file", "min_version", "client_ca_file")
UPSTREAM_TLS_KEYS = ("ca_file", "server_name", "cert_file", "key_file", "insecure_skip_verify")
VERSIONS: tuple[TlsVersion, ...] = ("1.2", "1.3")

# A DNS name as SNI carries it: labels of letters, digits and "-", dot-separated (no trailing dot, no wildcard).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_SERVER_NAME_HINT = 'a DNS name like "orders.internal", or an IP address'
_LISTENER = ListenerTls("", "")
_SKIP_WITH_CA = "cannot be used with insecure_skip_verify: true (nothing is verified)"


def moved_into_tls(keys: tuple[str, ...]) -> Mapping[str, str]:
    """``{key: "tls.<key>"}``: the hint for a TLS key written beside ``tls`` instead of inside it."""
    return {key: f"tls.{key}" for key in keys}


def compile_listener_tls(top: Fields) -> ListenerTls | None:
    """The top-level ``tls`` section: a certificate and key to serve, the lowest version accepted, and optionally
    the CAs client certificates must be signed by."""
    fields = top.section("tls", LISTENER_TLS_KEYS)
    if fields is None:
        return None
    cert_file = fields.required("cert_file", _file)
    key_file = fields.required("key_file", _file)
    min_version = fields.get("min_version", _version, _LISTENER.min_version)
    client_ca_file = fields.optional("client_ca_file", _file)
    if cert_file is None or key_file is None:
        return None
    return ListenerTls(cert_file, key_file, min_version, client_ca_file)


def compile_upstream_tls(cluster: Fields) -> UpstreamTls | None:
    """A cluster's ``tls`` section. ``tls: {}`` is valid: verify the upstream against the system's CAs."""
    fields = cluster.section("tls", UPSTREAM_TLS_KEYS)
    if fields is None:
        return None
    mark = fields.problems.mark()
    ca_file = fields.optional("ca_file", _file)
    server_name = fields.optional("server_name", _server_name)
    cert_file = fields.optional("cert_file", _file)
    key_file = fields.optional("key_file", _file)
    skip = fields.get("insecure_skip_verify", boolean, False)
    # A client certificate is a pair: one half alone cannot be presented.
    if fields.has("cert_file") and not fields.has("key_file"):
        fields.problems.add(fields.at("key_file"), "required with cert_file")
    if fields.has("key_file") and not fields.has("cert_file"):
        fields.problems.add(fields.at("cert_file"), "required with key_file")
    if skip and fields.has("ca_file"):
        # Both set reads as "verify against this CA", which is not what would happen: refuse the contradiction.
        fields.problems.add(fields.at("ca_file"), _SKIP_WITH_CA)
    if fields.problems.since(mark):
        return None
    return UpstreamTls(ca_file, server_name, cert_file, key_file, skip)


def _file(value: object, path: str, problems: Problems) -> str | None:
    text = string(value, path, problems)
    if text is not None and not text.strip():
        problems.add(path, "must not be empty")
        return None
    return text


def _version(value: object, path: str, problems: Problems) -> TlsVersion | None:
    # YAML reads an unquoted 1.2 as a number: accept it as written rather than make every user quote it.
    text = repr(value) if isinstance(value, float) else value if isinstance(value, str) else None
    if text is None:
        problems.add(path, f'expected "1.2" or "1.3", got {describe(value)}')
        return None
    for version in VERSIONS:
        if text == version:
            return version
    problems.add(path, f"unsupported TLS version {quote(text)} (one of {', '.join(VERSIONS)})")
    return None


def _server_name(value: object, path: str, problems: Problems) -> str | None:
    text = string(value, path, problems)
    if text is None:
        return None
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    if len(text) > 253 or _DNS_NAME.fullmatch(text) is None:
        problems.add(path, f"invalid server name {quote(text)} ({_SERVER_NAME_HINT})")
        return None
    return text.lower()  # DNS names are case-insensitive; certificates are matched without case
