"""Build ``ssl.SSLContext``s from TLS settings: the listener's (server) and each cluster's (client to upstreams).

The I/O half of the TLS config: the files named in a snapshot are read here, when a config is applied and by
``meshgate check``, and every way they can be wrong becomes a ``path: problem`` line (``tls.key_file: does not match
the certificate in ...``), the same shape as the compiler's. OpenSSL's own messages are terse ("key values
mismatch", "no start line"), so the common cases are checked first and named.

The defaults follow Mozilla's "intermediate" profile: TLS 1.2 or later; for TLS 1.2 only ECDHE key exchange with
AES-GCM or ChaCha20-Poly1305 (forward secrecy, AEAD); TLS 1.3 suites are OpenSSL's defaults (all strong). ALPN
offers ``http/1.1`` only: the proxy speaks HTTP/1.1 on both sides.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.config.errors import ConfigError, Problem
from gateway.config.snapshot import Cluster, ListenerTls, Snapshot, TlsVersion, UpstreamTls

__all__ = [
    "ALPN",
    "TLS12_CIPHERS",
    "ClientTls",
    "certificate_serial",
    "check_tls",
    "client_context",
    "harden",
    "server_context",
    "upstream_contexts",
]

TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
ALPN = ("http/1.1",)
_VERSIONS: Mapping[TlsVersion, ssl.TLSVersion] = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----")
_PEM_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
_ENCRYPTED = re.compile(rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED")


@dataclass(frozen=True, slots=True)
class ClientTls:
    """A cluster's client context, and a digest of the settings and file contents it was built from: an unchanged
    digest on the next apply keeps the cluster's pool (and its warm connections); a changed one replaces it."""

    context: ssl.SSLContext
    fingerprint: str


class _Invalid(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.problem = Problem(path, message)


def server_context(settings: ListenerTls, where: str = "tls") -> ssl.SSLContext:
    """The listener's context, certificate loaded; ``ConfigError`` naming the field whose file is wrong."""
    try:
        return _server(settings, where)
    except _Invalid as error:
        raise ConfigError((error.problem,)) from None


def client_context(settings: UpstreamTls, where: str) -> ClientTls:
    """A cluster's context for ``https`` to its endpoints; ``ConfigError`` naming the field whose file is wrong."""
    try:
        return _client(settings, where)
    except _Invalid as error:
        raise ConfigError((error.problem,)) from None


def upstream_contexts(clusters: Mapping[str, Cluster]) -> dict[str, ClientTls]:
    """A client context for every cluster with ``tls``; one ``ConfigError`` listing every cluster that fails."""
    contexts: dict[str, ClientTls] = {}
    problems: list[Problem] = []
    # Clusters are kept in file order, so the index is the one the document's path uses.
    for index, (name, cluster) in enumerate(clusters.items()):
        if cluster.tls is None:
            continue
        try:
            contexts[name] = _client(cluster.tls, f"clusters[{index}].tls")
        except _Invalid as error:
            problems.append(error.problem)
    if problems:
        raise ConfigError(problems)
    return contexts


def check_tls(snapshot: Snapshot) -> None:
    """Load every certificate, key and CA file ``snapshot`` names, as ``meshgate check`` must."""
    problems: list[Problem] = []
    if snapshot.tls is not None:
        try:
            _server(snapshot.tls, "tls")
        except _Invalid as error:
            problems.append(error.problem)
    try:
        upstream_contexts(snapshot.clusters)
    except ConfigError as error:
        problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)


def certificate_serial(path: str) -> str | None:
    """The serial number (hex) of the first certificate in ``path``, for logs; ``None`` if it cannot be read."""
    try:
        from cryptography import x509  # a dependency of pyjwt[crypto]; only logs need it

        return format(x509.load_pem_x509_certificate(Path(path).read_bytes()).serial_number, "X")
    except (OSError, ValueError):
        return None


def _server(settings: ListenerTls, where: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    harden(context, settings.min_version)
    _load_pair(context, settings.cert_file, settings.key_file, where)
    if settings.client_ca_file is not None:
        _load_ca(context, settings.client_ca_file, f"{where}.client_ca_file")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _client(settings: UpstreamTls, where: str) -> ClientTls:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    harden(context, "1.2")
    digest = hashlib.sha256(repr(settings).encode())
    if settings.insecure_skip_verify:
        context.check_hostname = False  # must come before verify_mode: OpenSSL refuses CERT_NONE with it on
        context.verify_mode = ssl.CERT_NONE
    elif settings.ca_file is not None:
        digest.update(_load_ca(context, settings.ca_file, f"{where}.ca_file"))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.cert_file is not None and settings.key_file is not None:
        digest.update(_load_pair(context, settings.cert_file, settings.key_file, where))
    return ClientTls(context, digest.hexdigest())


def harden(context: ssl.SSLContext, min_version: TlsVersion = "1.2") -> None:
    """The settings every context meshgate builds shares (module docstring): file listeners, upstream clients and
    the mesh's contexts alike, so the profile is changed in one place."""
    context.minimum_version = _VERSIONS[min_version]
    context.set_ciphers(TLS12_CIPHERS)  # TLS 1.2 only; TLS 1.3 suites are set apart, and all are strong
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(list(ALPN))


def _read(path: str, where: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _Invalid(where, f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def _load_pair(context: ssl.SSLContext, cert_file: str, key_file: str, where: str) -> bytes:
    """Load a certificate chain and its key; their contents, for fingerprints."""
    cert = _read(cert_file, f"{where}.cert_file")
    if _PEM_CERT.search(cert) is None:
        raise _Invalid(f"{where}.cert_file", f"no PEM certificate in {cert_file}")
    key = _read(key_file, f"{where}.key_file")
    if _ENCRYPTED.search(key) is not None:
        # OpenSSL would ask for a passphrase on the terminal; a proxy has nobody to ask.
        raise _Invalid(f"{where}.key_file", f"{key_file} holds an encrypted private key (give it unencrypted)")
    if _PEM_KEY.search(key) is None:
        raise _Invalid(f"{where}.key_file", f"no PEM private key in {key_file}")
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise _Invalid(f"{where}.key_file", f"does not match the certificate in {cert_file}") from None
        raise _Invalid(f"{where}.cert_file", f"cannot load {cert_file} with {key_file}: {_reason(exc)}") from None
    except OSError as exc:  # the files changed between reading and loading
        raise _Invalid(f"{where}.cert_file", f"cannot read {cert_file}: {exc.strerror or exc}") from None
    return cert + key


def _load_ca(context: ssl.SSLContext, ca_file: str, where: str) -> bytes:
    data = _read(ca_file, where)
    if _PEM_CERT.search(data) is None:
        raise _Invalid(where, f"no PEM certificate in {ca_file}")
    try:
        context.load_verify_locations(cadata=data.decode("ascii", errors="replace"))
    except ssl.SSLError as exc:
        raise _Invalid(where, f"cannot load {ca_file}: {_reason(exc)}") from None
    return data


def _reason(exc: ssl.SSLError) -> str:
    return (exc.reason or str(exc)).lower().replace("_", " ")


def _no_passphrase() -> bytes:
    return b""
