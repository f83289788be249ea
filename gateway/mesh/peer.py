"""The identity a TLS peer proved: the SPIFFE URI SAN of a certificate that verified against the mesh CA bundle.

Pure over what ``ssl.SSLObject.getpeercert()`` returns: ``None`` (no certificate), ``{}`` (one that was not
verified: never an identity) or the decoded certificate, whose ``subjectAltName`` lists ``("URI", ...)`` pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["peer_identity", "uri_sans"]


def uri_sans(cert: Mapping[str, Any] | None) -> list[str]:
    if not cert:
        return []
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]


def peer_identity(cert: Mapping[str, Any] | None) -> str:
    """The first ``spiffe://`` URI SAN of a verified certificate; ``""`` when there is none."""
    for uri in uri_sans(cert):
        if uri.startswith("spiffe://"):
            return uri
    return ""
