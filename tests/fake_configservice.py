"""A small fake config service (config and bundle API for one service) speaking the documented protocol: ETag
``"N-<12 hex of the content hash>"`` (the plain ``"N"`` accepted too), ``If-None-Match`` -> 304, ``?wait=``
long-poll, bearer token. For tests of the gateway side written while the real service is built; it records the
report headers of every poll."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["SERVICE", "TOKEN", "FakeService", "pushed"]

TOKEN = "gw-token-0123456789"
SERVICE = "orders"


def pushed(*routes: str, cluster: str = "127.0.0.1:9", **extra: Any) -> dict[str, Any]:
    """A pushed config: one route per name (``/<name>`` prefix) to cluster ``c`` at ``cluster``."""
    return {
        "routes": [{"name": name, "match": {"path_prefix": f"/{name}"}, "cluster": "c"} for name in routes],
        "clusters": [{"name": "c", "endpoints": [cluster]}],
        **extra,
    }


@dataclass
class FakeService:
    """The config service's config and bundle API, for one service, with the knobs the tests turn."""

    port: int
    service: str = SERVICE
    versions: list[dict[str, Any]] = field(default_factory=list)
    bundles: dict[str, bytes] = field(default_factory=dict)
    polls: list[dict[str, str]] = field(default_factory=list)  # the headers of every config GET
    bundle_gets: list[tuple[str, str | None]] = field(default_factory=list)
    token: str = TOKEN
    # True: answer every config GET at once with 200 and the latest version (a proxy that strips If-None-Match).
    ignore_if_none_match: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def etag(self, version: int) -> str:
        """The ETag of ``version`` as the real service makes it (content hash: see ``configs.config_etag``)."""
        text = json.dumps(self.versions[version - 1], sort_keys=True, separators=(",", ":"))
        return f'"{version}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"'

    def restore(self, versions: list[dict[str, Any]]) -> None:
        """The store wiped or restored from a backup: numbering starts again, with other content."""
        self.versions = versions
        self.changed.set()
        self.changed = asyncio.Event()

    def push(self, config: dict[str, Any]) -> int:
        self.versions.append(config)
        self.changed.set()
        self.changed = asyncio.Event()
        return len(self.versions)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/services/{service}/config", self._config)
        app.router.add_get("/v1/bundles/{name}", self._bundle)
        # A parked long-poll must not hold a stop for its whole wait.
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def _auth(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized(text=json.dumps({"error": "unauthenticated"}))

    async def _config(self, request: web.Request) -> web.StreamResponse:
        self.polls.append(dict(request.headers))
        self._auth(request)
        assert request.match_info["service"] == self.service
        seen = None if self.ignore_if_none_match else request.headers.get("If-None-Match")
        wait = request.query.get("wait")
        newest = len(self.versions)
        # The current tag, or the plain "N" of older gateways ("0": waiting for a first version).
        current = seen is not None and seen in {f'"{newest}"', *((self.etag(newest),) if newest else ())}
        if current and wait:
            # Long-poll: answer the moment a newer version lands, or 304 at the wait's end.
            seconds = float(wait.removesuffix("s").removesuffix("m")) * (60 if wait.endswith("m") else 1)
            try:
                await asyncio.wait_for(self.changed.wait(), seconds)
            except TimeoutError:
                return web.Response(status=304, headers={"ETag": seen or ""})
            newest = len(self.versions)
        elif current:
            return web.Response(status=304, headers={"ETag": seen or ""})
        if newest == 0:
            return web.json_response({"error": "not_found"}, status=404)
        body = {"version": newest, "config": self.versions[newest - 1], "hash": "x", "author": "ops"}
        return web.json_response(body, headers={"ETag": self.etag(newest)})

    async def _bundle(self, request: web.Request) -> web.StreamResponse:
        self._auth(request)
        name = request.match_info["name"]
        self.bundle_gets.append((name, request.headers.get("If-None-Match")))
        data = self.bundles.get(name)
        if data is None:
            return web.json_response({"error": "not_found"}, status=404)
        etag = f'"{hash(data) & 0xFFFFFFFF:x}"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=data, content_type="application/gzip", headers={"ETag": etag})
