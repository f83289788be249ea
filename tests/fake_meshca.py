"""A fake of the config service's mesh CA endpoints (CONTRACT 7), for tests written while the real ones are built.

``GET /v1/ca``: the PEM bundle of every trusted CA, with an ETag (304 on ``If-None-Match``). ``POST /v1/certificates``
with a PEM CSR and a gateway token bound to a service: 201 with a certificate for that service's SPIFFE identity
(URI SAN, EKU serverAuth + clientAuth) signed by the signing CA, valid for ``ttl`` seconds. Knobs the tests turn:
``ttl``, ``failing`` (answer 503), ``rotate()`` (a new CA trusted beside the old, then signing), ``revoke(token)``.
It also answers ``GET /v1/services/{service}/config`` with version 1 and an empty pushed config, so a gateway whose
bootstrap holds its routes and clusters runs against it alone.

It runs in a thread of its own with its own event loop (``running_meshca``), so sync fixtures can share it with the
gateway processes.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.certs import CA, make_ca
from tests.procs import free_port

__all__ = ["FakeMeshCA", "running_meshca"]


@dataclass
class FakeMeshCA:
    directory: Path
    tokens: dict[str, str]  # token -> service
    trust_domain: str = "meshgate.local"
    ttl: float = 3600.0
    failing: bool = False
    port: int = field(default_factory=free_port)
    cas: list[CA] = field(default_factory=list)  # every trusted CA; the last one signs
    issued: list[tuple[str, int]] = field(default_factory=list)  # (identity, serial) of every certificate
    ca_gets: int = 0

    def __post_init__(self) -> None:
        if not self.cas:
            self.cas.append(make_ca(self.directory / "mesh-ca-0", "mesh-ca-0"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bundle(self) -> bytes:
        return b"".join(ca.cert.public_bytes(serialization.Encoding.PEM) for ca in self.cas)

    def rotate(self) -> CA:
        """A new CA, trusted beside the old ones and signing from now on."""
        ca = make_ca(self.directory / f"mesh-ca-{len(self.cas)}", f"mesh-ca-{len(self.cas)}")
        self.cas.append(ca)
        return ca

    def revoke(self, token: str) -> None:
        self.tokens.pop(token, None)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/ca", self._ca)
        app.router.add_post("/v1/certificates", self._certificate)
        app.router.add_get("/v1/services/{service}/config", self._config)
        return app

    async def _config(self, request: web.Request) -> web.StreamResponse:
        self._service(request)
        if request.headers.get("If-None-Match") == '"1"':
            if request.query.get("wait"):
                await asyncio.sleep(1.0)  # a short long-poll: nothing ever changes here
            return web.Response(status=304, headers={"ETag": '"1"'})
        return web.json_response({"version": 1, "config": {}}, headers={"ETag": '"1"'})

    def _service(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        service = self.tokens.get(header.removeprefix("Bearer "))
        if not header.startswith("Bearer ") or service is None:
            raise web.HTTPUnauthorized(text=json.dumps({"error": "unauthenticated"}), content_type="application/json")
        return service

    async def _ca(self, request: web.Request) -> web.StreamResponse:
        self._service(request)
        self.ca_gets += 1
        bundle = self.bundle
        etag = '"' + hashlib.sha256(bundle).hexdigest()[:16] + '"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=bundle, headers={"ETag": etag, "Content-Type": "application/x-pem-file"})

    async def _certificate(self, request: web.Request) -> web.StreamResponse:
        service = self._service(request)
        if self.failing:
            raise web.HTTPServiceUnavailable(text=json.dumps({"error": "unavailable"}), content_type="application/json")
        if request.content_type != "application/x-pem-file":
            raise web.HTTPUnsupportedMediaType()
        csr = x509.load_pem_x509_csr(await request.read())
        if not csr.is_signature_valid:
            raise web.HTTPBadRequest(text=json.dumps({"error": "bad CSR signature"}), content_type="application/json")
        identity = f"spiffe://{self.trust_domain}/service/{service}"
        ca = self.cas[-1]
        now = datetime.datetime.now(datetime.UTC)
        start, end = now - datetime.timedelta(seconds=1), now + datetime.timedelta(seconds=self.ttl)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(ca.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256())
        )
        self.issued.append((identity, cert.serial_number))
        body = {
            "certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
            "ca": self.bundle.decode(),
            "identity": identity,
            "not_after": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "serial": format(cert.serial_number, "x"),
        }
        return web.json_response(body, status=201)


@contextmanager
def running_meshca(fake: FakeMeshCA) -> Iterator[FakeMeshCA]:
    """Serve ``fake`` on 127.0.0.1 from a thread with its own event loop, until the block ends."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(fake.app(), access_log=None)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", fake.port).start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, name="fake-meshca", daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
