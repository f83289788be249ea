"""Key material and config snippets for ``bench/run.py --policy`` (JWT authn + embedded Rego authz).

One RSA-2048 key pair is made per run. Its public half is written as ``<dir>/jwks.json`` (served by a real
``python -m http.server`` process that the harness starts), and one RS256 token is signed with it, whose claims make
the shipped policy (``policy/rego``, ``data.json``) allow ``GET`` on the route :data:`ROUTE`: the data grants
``orders-read`` / ``GET`` to role ``orders.read``, which the token carries in its ``roles`` claim. ``iss`` and
``aud`` match the generated ``authn`` section; ``exp`` is ten years away.

Tokens are built with pyjwt (as the gateway's own verifier uses), not with ``tests/jwt_tokens.py``: the bench does not
import test helpers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER = "https://idp.bench.invalid"
AUDIENCE = "bench"
KID = "bench-rsa-1"
# The benchmark route's name: data.json lets role ROLE use METHOD on it, so the shipped policy allows every request.
ROUTE = "orders-read"
ROLE = "orders.read"
METHOD = "GET"
BUNDLE = Path(__file__).resolve().parent.parent / "policy" / "rego"
TEN_YEARS_S = 10 * 365 * 24 * 3600


@dataclass(frozen=True)
class Identity:
    """The JWKS directory to serve and the bearer token wrk sends."""

    jwks_dir: Path
    token: str
    claims: dict[str, object]

    @property
    def authorization(self) -> str:
        return f"Bearer {self.token}"


def check_policy_allows(bundle: Path = BUNDLE) -> None:
    """Fail early if the shipped data no longer grants ROLE for METHOD on ROUTE (the bench would measure 403s)."""
    data = json.loads((bundle / "data.json").read_text())
    rules = data["meshgate"]["access"]["routes"].get(ROUTE, {})
    roles = rules.get(METHOD, rules.get("*"))
    if roles is None or (roles and ROLE not in roles):
        raise RuntimeError(f"{bundle}/data.json does not grant {METHOD} on route {ROUTE} to role {ROLE}: {rules}")


def make_identity(directory: Path) -> Identity:
    """A fresh key pair: ``directory/jwks.json`` with its public JWK, and a long-lived RS256 token signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": KID, "alg": "RS256", "use": "sig"})
    (directory / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "bench-user",
        "roles": [ROLE],
        "iat": now - 60,
        "exp": now + TEN_YEARS_S,
    }
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})
    return Identity(directory, token, claims)


def authn_yaml(jwks_url: str) -> str:
    """The ``authn`` section: RS256 only, keys from ``jwks_url``."""
    return (
        f'authn:\n  jwt: {{issuer: "{ISSUER}", audiences: [{AUDIENCE}], jwks_url: "{jwks_url}", algorithms: [RS256]}}\n'
    )


def authz_yaml(cache: bool, decision_log: bool, bundle: Path = BUNDLE) -> str:
    """The ``authz`` section: the embedded engine on the shipped bundle, optionally with a 60 s decision cache."""
    cache_part = ", cache: {ttl: 60s}" if cache else ""
    log_part = "true" if decision_log else "false"
    return f'authz: {{engine: embedded, bundle: "{bundle}"{cache_part}, decision_log: {log_part}}}\n'
