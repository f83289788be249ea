"""The demo's identity provider: publishes a JWKS and mints RS256 tokens for whoever asks. DEMO ONLY.

``python -m gateway.demo.idp [--listen 127.0.0.1:7777]``

- ``GET /.well-known/jwks.json``: the public key (a fresh RSA key per start; the sidecars fetch it from here).
- ``GET /token?sub=alice&roles=orders.read,orders.write[&ttl=3600]``: a signed token as plain text, issuer
  ``https://idp.meshgate.demo``, audience ``meshgate-demo``, the ``roles`` claim the shipped policy reads.

Anyone who can reach it gets any role: it stands in for a real IdP (Keycloak, Auth0, Dex) in the demo and in the
compose stack, and must never be exposed beyond them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config.values import parse_address

__all__ = ["AUDIENCE", "ISSUER", "build_app", "main"]

ISSUER = "https://idp.meshgate.demo"
AUDIENCE = "meshgate-demo"
MAX_TTL = 86_400


def build_app() -> web.Application:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = f"demo-{uuid.uuid4().hex[:8]}"
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = {"keys": [{**jwk, "kid": kid, "alg": "RS256", "use": "sig"}]}

    async def keys(_request: web.Request) -> web.Response:
        return web.json_response(jwks, headers={"cache-control": "max-age=300"})

    async def token(request: web.Request) -> web.Response:
        sub = request.query.get("sub", "")
        if not sub or len(sub) > 64:
            raise web.HTTPBadRequest(text="sub: required, at most 64 characters\n")
        try:
            ttl = int(request.query.get("ttl", "3600"))
        except ValueError:
            raise web.HTTPBadRequest(text="ttl: seconds, an integer\n") from None
        if not 0 < ttl <= MAX_TTL:
            raise web.HTTPBadRequest(text=f"ttl: between 1 and {MAX_TTL} seconds\n")
        roles = [role for role in request.query.get("roles", "").split(",") if role]
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "roles": roles, "iat": now, "exp": now + ttl}
        signed = jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})
        return web.Response(text=signed + "\n")

    async def index(_request: web.Request) -> web.Response:
        return web.Response(text=__doc__ or "")

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", keys)
    app.router.add_get("/token", token)
    app.router.add_get("/", index)
    return app


async def _serve(host: str, port: int) -> int:
    runner = web.AppRunner(build_app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as error:
        print(f"idp: cannot listen on {host}:{port}: {error.strerror or error}", file=sys.stderr, flush=True)
        await runner.cleanup()
        return 1
    print(f"idp: listening on http://{host}:{port} (DEMO ONLY: mints any token)", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.demo.idp", description="The demo's token issuer.")
    parser.add_argument("--listen", default="127.0.0.1:7777", help="host:port (default 127.0.0.1:7777)")
    args = parser.parse_args(argv)
    try:
        address = parse_address(args.listen)
    except ValueError as error:
        parser.error(f"--listen: {error}")
    return asyncio.run(_serve(address.host, address.port))


if __name__ == "__main__":
    sys.exit(main())
