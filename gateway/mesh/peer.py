"""The identity a TLS peer proved: the SPIFFE URI SAN of a certificate that verified against the mesh CA bundle.

OpenSSL verifies the chain but judges none of what makes a certificate a mesh identity, so it is judged here, the
same way for callers (the listener: ``attributes.source.principal``) and for callees (``connector.py``):

- the certificate must have verified: ``getpeercert()`` is ``None`` without one and ``{}`` for one that was not
  verified (``CERT_NONE``), and only then is its DER (which is returned either way) decoded;
- it must be a leaf: OpenSSL accepts a ``CA:true`` certificate as the end of a chain, and a CA's SPIFFE name is no
  workload's identity;
- it must carry exactly one URI SAN, as the X.509-SVID spec requires: with several, "which one is the caller" has
  no answer that a policy could rely on;
- that URI must be a SPIFFE ID in the mesh's trust domain: a bundle may hold CAs that also sign for others
  (``--ca-trust``), and a name they give outside this domain is not a mesh identity.

Decoding costs tens of microseconds, once per connection (the listener keeps the answer on the connection).
"""

from __future__ import annotations

import ssl

from cryptography import x509

__all__ = ["identity_of", "peer_identity", "uri_sans"]


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Every URI SAN of ``cert`` (``[]`` without a SAN extension, or with one that does not decode)."""
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return []
    return list(extension.value.get_values_for_type(x509.UniformResourceIdentifier))


def identity_of(cert: x509.Certificate, trust_domain: str) -> str:
    """The mesh identity ``cert`` names (rules in the module docstring); ``""`` when it names none."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    except ValueError:  # extensions that do not decode: nothing in them can be trusted
        return ""
    if constraints is not None and constraints.ca:
        return ""
    names = uri_sans(cert)
    if len(names) != 1 or not names[0].startswith(f"spiffe://{trust_domain}/"):
        return ""
    return names[0]


def peer_identity(tls: ssl.SSLObject | None, trust_domain: str) -> str:
    """The verified identity of the peer of ``tls`` (``None``: a plain connection); ``""`` when it proved none."""
    if tls is None or not tls.getpeercert():
        return ""
    der = tls.getpeercert(binary_form=True)
    if der is None:
        return ""
    try:
        return identity_of(x509.load_der_x509_certificate(der), trust_domain)
    except ValueError:
        return ""
