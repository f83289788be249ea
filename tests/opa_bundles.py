"""OPA's bundle plugin in the OPA stand-in: bundles downloaded from a bundle service, polled and activated.

``python -m tests.opa_server --config-file FILE`` runs a ``BundlePlugin`` over the bundles that OPA config file
configures (read by ``tests/opa_config.py``). What OPA does, this does:

- each bundle is downloaded at start, then again after a random delay between the polling bounds, and after a
  failure with OPA's backoff (0.1 s growing by 1.6x, capped at the max delay, +-20% jitter);
- ``GET {service url}/{resource}`` with ``Authorization: <scheme> <token>``, where a ``token_path`` file is read and
  stripped on every request (a rotated token is used at once), and ``If-None-Match`` with the ETag of the last
  download; 304 means unchanged, any status but 200/304 is an error;
- a downloaded bundle (a gzipped tarball, read by ``policy.bundle.load_bundle``) is activated in one step
  (``activate_bundle``): its previous modules are removed, the data under its old and new manifest ``roots`` is
  erased, its modules (every ``.rego`` file, ``*_test.rego`` included, as OPA loads them; ids
  ``<bundle name>/<file>``) and data are written, and the whole is compiled before the swap. A bundle that does not
  parse or compile leaves the previous one serving, and the download cache falls back to the activated bundle's ETag
  (OPA's ``SetCache``), so the same broken bundle is fetched again and a fixed one gets through;
- roots of two bundles may not overlap; ``provenance`` reports ``{"bundles": {NAME: {"revision": ...}}}``;
- ``/health?bundles`` (also ``?bundles=true``) is 500 ``{"error": HEALTH_BUNDLES_ERROR}`` until every configured
  bundle has been activated once (``BundlePlugin.ready``; later failures do not make it unhealthy again, as in OPA).

Known differences from OPA: a bundle without a manifest revision reports the loader's content revision (OPA reports
""), and a bundle with no ``.rego`` file is refused (``load_bundle`` requires one; OPA accepts data-only bundles).
Download and activation outcomes are logged on stderr, one ``opa_server: bundle NAME: ...`` line each.

The Go runtime must never be forked: the downloader runs on the server's own event loop (aiohttp client, a temporary
file for the tarball): no thread pool, no subprocess, no fork. Activation goes through ``OpaState.swap``, in the
server process only.
"""

from __future__ import annotations

import asyncio
import copy
import random
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from policy.bundle import Bundle, _check_package_root, load_bundle
from policy.engine import PolicyLoadError
from tests.opa_config import BundleSource, log
from tests.opa_state import OpaState, StateError

__all__ = ["HEALTH_BUNDLES_ERROR", "BundlePlugin", "BundleStatus", "DownloadError", "activate_bundle"]

MIN_RETRY_DELAY = 0.1  # OPA's first retry delay after a failed download, before the 1.6x backoff
HEALTH_BUNDLES_ERROR = "one or more bundles are not activated"  # OPA's /health?bundles message


# -- activation ----------------------------------------------------------------------------------------------------


def activate_bundle(state: OpaState, name: str, bundle: Bundle) -> None:
    """Make ``bundle`` the active bundle ``name`` of ``state`` in one swap, as OPA's bundle plugin does;
    ``StateError`` (and nothing changed) when its roots overlap another bundle's or the result does not compile."""
    for other, roots in sorted(state.bundle_roots.items()):
        if other != name and any(_overlap(a, b) for a in bundle.roots for b in roots):
            message = f"detected overlapping roots in bundle manifest with: [{other}]"  # OPA's wording
            raise StateError(409, {"code": "bundle_error", "message": message})
    # Every .rego file is a module to OPA, *_test.rego included (the loader keeps tests apart and checks only
    # the others against the roots; OPA refuses a bundle whose test module lies outside them too).
    for file, text in bundle.tests:
        try:
            _check_package_root(file, text, bundle.roots)
        except PolicyLoadError as exc:
            raise StateError(400, {"code": "bundle_error", "message": str(exc)}) from None
    previous = state.bundle_modules.get(name, frozenset())
    modules = {f"{name}/{file}": text for file, text in (*bundle.modules, *bundle.tests)}
    policies = {pid: raw for pid, raw in state.policies.items() if pid not in previous}
    policies.update(modules)
    data = copy.deepcopy(state.data)
    # The old roots too: a revision that drops a root must not leave that root's old data behind.
    for root in sorted({*state.bundle_roots.get(name, ()), *bundle.roots}):
        _erase(data, root)
    _merge(data, bundle.data)
    state.swap(policies, data)
    state.bundle_modules[name] = frozenset(modules)
    state.bundle_roots[name] = bundle.roots
    state.revisions[name] = bundle.revision


def _overlap(a: str, b: str) -> bool:
    """Do two bundle roots (``a/b`` paths, ``""`` for the whole tree) share any path?"""
    return not a or not b or a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _erase(data: dict[str, Any], root: str) -> None:
    """Remove the document at ``root`` (``""``: everything), as OPA erases a bundle's roots before writing it."""
    if not root:
        data.clear()
        return
    *parents, last = root.split("/")
    node: Any = data
    for segment in parents:
        node = node.get(segment) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def _merge(into: dict[str, Any], document: Mapping[str, Any]) -> None:
    """Write ``document`` into ``into``, merging objects (the roots were erased first, so nothing old survives)."""
    for key, value in document.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


# -- download ------------------------------------------------------------------------------------------------------


def _backoff(retries: int, max_delay: float) -> float:
    """OPA's util.DefaultBackoff(minRetryDelay, maxDelay, retries): 1.6x per retry, capped, +-20% jitter."""
    delay = MIN_RETRY_DELAY
    while delay < max_delay and retries > 0:
        delay *= 1.6
        retries -= 1
    return max(0.0, min(delay, max_delay) * (1 + 0.2 * (random.random() * 2 - 1)))


class DownloadError(Exception):
    """A download that gave no bundle (connection, status, unreadable token file)."""


@dataclass(slots=True)
class BundleStatus:
    etag: str = ""  # sent as If-None-Match: the downloader's cache
    activated_etag: str = ""  # the activated bundle's ETag; the cache falls back to it after a failure
    activated: bool = False
    revision: str = ""
    error: str = ""


class BundlePlugin:
    """Downloads and activates every configured bundle, each on its own polling loop on the server's event loop."""

    def __init__(self, state: OpaState, sources: list[BundleSource]) -> None:
        self.state = state
        self.sources = sources
        self.status = {source.name: BundleStatus() for source in sources}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def ready(self) -> bool:
        return all(status.activated for status in self.status.values())

    async def start(self, _app: web.Application) -> None:
        self._session = aiohttp.ClientSession(trust_env=False)  # a proxy in the environment must not intervene
        self._tasks = [asyncio.create_task(self._poll(source)) for source in self.sources]

    async def stop(self, _app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _poll(self, source: BundleSource) -> None:
        retries = 0
        while True:
            if await self.download(source):
                retries = 0
                delay = random.uniform(source.min_delay, source.max_delay)
            else:
                retries += 1
                delay = _backoff(retries, source.max_delay)
            # OPA would poll back to back with both delays 0; a floor keeps such a config from spinning a CPU.
            await asyncio.sleep(max(delay, 0.01))

    async def download(self, source: BundleSource) -> bool:
        """One request for ``source``, and the activation of what it brought: True unless anything failed."""
        status = self.status[source.name]
        try:
            raw, etag = await self._fetch(source, status.etag)
        except DownloadError as exc:
            return self._failed(source.name, f"download failed: {exc}")
        if raw is None:
            status.error = ""
            return True  # 304: nothing changed
        try:
            bundle = _load_tarball(raw)
        except PolicyLoadError as exc:
            return self._failed(source.name, f"download failed: {exc}")  # OPA parses while downloading
        try:
            activate_bundle(self.state, source.name, bundle)
        except StateError as exc:
            return self._failed(source.name, f"activation failed: {_error_text(exc)}")
        status.etag = status.activated_etag = etag
        status.activated, status.revision, status.error = True, bundle.revision, ""
        log(f"bundle {source.name}: activated revision {bundle.revision!r} (etag {etag or 'none'})")
        return True

    async def _fetch(self, source: BundleSource, etag: str) -> tuple[bytes | None, str]:
        """``(body, ETag)`` of a 200, ``(None, etag)`` of a 304, else ``DownloadError``."""
        assert self._session is not None
        headers = dict(source.service.headers)
        try:
            authorization = source.service.authorization()
        except OSError as exc:
            raise DownloadError(f"token_path: {exc.strerror or exc}: {exc.filename}") from None
        if authorization is not None:
            headers["Authorization"] = authorization
        if etag:
            headers["If-None-Match"] = etag
        timeout = aiohttp.ClientTimeout(total=source.service.timeout)
        try:
            async with self._session.get(source.url, headers=headers, timeout=timeout) as response:
                if response.status == 304:
                    return None, etag
                if response.status != 200:
                    raise DownloadError(f"server replied with {_status_text(response.status)}")  # OPA's wording
                return await response.read(), response.headers.get("ETag", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DownloadError(f"{type(exc).__name__}: {exc}") from None

    def _failed(self, name: str, error: str) -> bool:
        status = self.status[name]
        # OPA's plugin resets the downloader's cache to the activated bundle's ETag: a broken bundle is fetched
        # again next time (it might be fixed by then) and a return to the activated one is a 304.
        status.etag, status.error = status.activated_etag, error
        log(f"bundle {name}: {error}")
        return False


def _load_tarball(raw: bytes) -> Bundle:
    with tempfile.TemporaryDirectory(prefix="opa-bundle-") as directory:
        path = Path(directory, "bundle.tar.gz")
        path.write_bytes(raw)
        try:
            return load_bundle(path)
        except PolicyLoadError as exc:
            raise PolicyLoadError(str(exc).replace(str(path), "bundle")) from None


def _status_text(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return str(status)


def _error_text(exc: StateError) -> str:
    errors = exc.body.get("errors") or []
    details = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
    return f"{exc.body.get('message', '')}: {details}" if details else str(exc.body.get("message", ""))
