"""Compile the top-level ``mesh`` section and a cluster's ``mesh_identity``.

Pure. ``mesh`` says the gateway takes part in the mesh: it gets a certificate for its service from the config service
(so the section needs ``config_service``) and serves its listener with it. A listener ``tls`` section beside it is
refused: one listener has one identity. ``mesh_identity`` on a cluster names the SPIFFE identity its endpoints must
present, in the mesh's own trust domain (a certificate from the mesh CA never carries another one).
"""

from __future__ import annotations

import re

from gateway.config.schema import Fields, choice, matching, string
from gateway.config.snapshot import MESH_MODES, MeshSettings
from gateway.config.values import quote

__all__ = ["MESH_KEYS", "TRUST_DOMAIN", "compile_mesh", "mesh_identity", "spiffe_id"]

MESH_KEYS = ("mtls", "trust_domain")
_DEFAULT = MeshSettings()

# Trust domains are DNS-like and lower-case: labels of [a-z0-9-], dot-separated. The SPIFFE spec also allows "_",
# but the config service's CA (which signs the identities) takes DNS names only, and one rule must hold on both.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
TRUST_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_trust_domain = matching(
    TRUST_DOMAIN, "trust domain", 'a DNS-like name: lower-case letters, digits, "-", dot-separated'
)
_mode = choice(MESH_MODES, "mode")
# A meshgate identity: spiffe://<trust domain>/service/<service name>; the service alphabet is the top-level one.
_IDENTITY = re.compile(
    rf"spiffe://(?P<domain>{TRUST_DOMAIN.pattern})/service/(?P<service>[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?)"
)
_IDENTITY_HINT = "spiffe://<trust domain>/service/<service name>"


def spiffe_id(trust_domain: str, service: str) -> str:
    """The identity the mesh CA gives ``service``: ``spiffe://<trust_domain>/service/<service>``."""
    return f"spiffe://{trust_domain}/service/{service}"


def compile_mesh(top: Fields) -> MeshSettings | None:
    """The section, or ``None`` when absent or invalid (its problems recorded)."""
    fields = top.section("mesh", MESH_KEYS)
    if fields is None:
        return None
    mark = fields.problems.mark()
    mtls = fields.get("mtls", _mode, _DEFAULT.mtls)
    trust_domain = fields.get("trust_domain", _trust_domain, _DEFAULT.trust_domain)
    if not top.has("config_service"):
        fields.problems.add("mesh", "needs a config_service section (the mesh certificate comes from it)")
    if top.has("tls"):
        # The listener serves the mesh certificate; a second one would be a second identity on one port.
        fields.problems.add("mesh", "cannot be used with a tls section (one listener, one identity)")
    if fields.problems.since(mark):
        return None
    return MeshSettings(mtls, trust_domain)


def mesh_identity(cluster: Fields, trust_domain: str | None) -> str | None:
    """A cluster's ``mesh_identity``. ``trust_domain``: the mesh's; ``None`` when the config has no ``mesh``
    section, ``""`` when it has one with problems (reported there: the domain is then not checked)."""
    text = cluster.optional("mesh_identity", string)
    if text is None:
        return None
    path = cluster.at("mesh_identity")
    match = _IDENTITY.fullmatch(text)
    if match is None:
        cluster.problems.add(path, f"invalid mesh identity {quote(text)} ({_IDENTITY_HINT})")
        return None
    if cluster.has("tls"):
        cluster.problems.add(path, "cannot be used with tls (mesh mTLS brings its own certificates)")
        return None
    if trust_domain is None:
        cluster.problems.add(path, "needs a top-level mesh section (the gateway's own mesh certificate)")
        return None
    if trust_domain and match["domain"] != trust_domain:
        cluster.problems.add(path, f"trust domain {quote(match['domain'])} is not the mesh's ({quote(trust_domain)})")
        return None
    return text
