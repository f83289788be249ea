"""``RemoteEngine``: the ``opa`` engine, asking an OPA server (usually a sidecar) over its REST Data API.

One decision is ``POST {url}/v1/data/{decision}?provenance=true`` with ``{"input": ...}`` on a pooled keep-alive
session. ``{"result": v}`` gives ``v``; an answer without ``result`` is OPA's way of saying undefined and gives
``UNDEFINED``. Everything else -- a timeout, a refused or dropped connection, a non-200 status, a body that is not a
JSON object -- raises ``PolicyError`` with a one-line message (``opa: timeout after 250ms``, ``opa: HTTP 500: <OPA's
message>``, ``opa: connection refused (127.0.0.1:8181)``) and the authz stage fails closed.

Why aiohttp directly and not opa-python-client's ``AsyncOpaClient`` (which ``policy/opa_push.py`` does use):

- ``query_rule`` calls ``raise_for_status()`` and releases the response, so OPA's error message is lost on a 500;
- it retries 500/502/504 and connection errors with 0.3 s, 0.6 s sleeps by default: on the request path that spends
  the whole authz budget, and a retried deny is still a deny;
- its session exists only inside ``async with`` and cannot be shared or injected, and its URL is rebuilt from
  host and port, so no path prefix (OPA behind a proxy) and no pre-built URL;
- the timeout is fixed per session and there is no connector limit; the package ships no type information.
Doing it by hand is one request and thirty lines, with the message and the budget under our control.

The revision comes from the ``provenance`` OPA returns with each decision (``?provenance=true`` adds a couple of
hundred bytes and no extra round trip): the revision of the single activated bundle, ``name=rev,...`` for several,
"" when OPA has no bundle (policies pushed through the Policy API).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from yarl import URL

from policy.engine import UNDEFINED, PolicyError, rule_path

__all__ = ["CONNECTION_LIMIT", "RemoteEngine"]

# Connections kept to OPA per gateway process. A sidecar OPA answers in well under a millisecond, so a few dozen
# cover thousands of decisions a second; more would only queue inside OPA instead of here.
CONNECTION_LIMIT: Final = 32
_MESSAGE_LIMIT: Final = 200  # characters of OPA's own message kept in a PolicyError


class RemoteEngine:
    """An ``Engine`` backed by an OPA server's Data API; one fixed decision path, one total timeout per decision."""

    def __init__(self, url: str, decision: str, timeout: float, session: aiohttp.ClientSession | None = None) -> None:
        base = url.rstrip("/")
        path = "/".join(quote(segment, safe="") for segment in rule_path(decision))
        # Built once: every decision posts to the same URL, so yarl need not re-parse and re-quote a string each time.
        self._url = URL(f"{base}/v1/data/{path}?provenance=true", encoded=True)
        self._target = f"{self._url.host}:{self._url.port}"
        self._timeout = timeout
        self._timeout_text = f"{round(timeout * 1000)}ms"
        self._session = session
        self._owns_session = session is None
        self._revision = ""

    @property
    def name(self) -> str:
        return "opa"

    @property
    def revision(self) -> str:
        """The bundle revision OPA reported with the latest decision ("" before the first or without bundles)."""
        return self._revision

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop: aiohttp warns when a session is made outside one.
        if self._session is None or (self._owns_session and self._session.closed):
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CONNECTION_LIMIT),
                trust_env=False,  # an HTTP(S)_PROXY in the environment must not route sidecar traffic elsewhere
                timeout=aiohttp.ClientTimeout(total=None),  # the per-decision budget is enforced in evaluate()
                raise_for_status=False,
            )
            self._owns_session = True
        return self._session

    async def evaluate(self, input: Mapping[str, Any]) -> object:
        body = json.dumps({"input": input}, separators=(",", ":")).encode()
        try:
            # One budget for the whole decision: waiting for a pooled connection, the retry below, and the body.
            async with asyncio.timeout(self._timeout):
                try:
                    status, payload = await self._post(body)
                except aiohttp.ServerDisconnectedError:
                    # A pooled keep-alive connection OPA had already closed (idle close, sidecar restart): nothing
                    # was answered, and a query changes nothing, so one immediate retry on a fresh connection.
                    status, payload = await self._post(body)
        except TimeoutError:
            raise PolicyError(f"opa: timeout after {self._timeout_text}") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                raise PolicyError(f"opa: connection refused ({self._target})") from None
            raise PolicyError(f"opa: cannot connect to {self._target}: {exc.os_error.strerror or exc}") from None
        except aiohttp.ClientError as exc:
            raise PolicyError(f"opa: {type(exc).__name__}: {exc}"[:_MESSAGE_LIMIT]) from None
        if status != 200:
            raise PolicyError(f"opa: HTTP {status}: {_error_message(payload)}")
        try:
            document = json.loads(payload)
        except ValueError:
            raise PolicyError("opa: answer is not JSON") from None
        if not isinstance(document, dict):
            raise PolicyError("opa: answer is not a JSON object")
        self._note_revision(document.get("provenance"))
        return document.get("result", UNDEFINED)

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        async with self._client().post(self._url, data=body, headers={"Content-Type": "application/json"}) as response:
            return response.status, await response.read()

    def _note_revision(self, provenance: object) -> None:
        if not isinstance(provenance, dict):
            return
        bundles = provenance.get("bundles")
        if isinstance(bundles, dict) and bundles:
            revisions = {str(name): str(b.get("revision", "")) for name, b in bundles.items() if isinstance(b, dict)}
            if len(revisions) == 1:
                self._revision = next(iter(revisions.values()))
            else:
                self._revision = ",".join(f"{name}={rev}" for name, rev in sorted(revisions.items()))
        elif isinstance(provenance.get("revision"), str):
            self._revision = provenance["revision"]  # OPA < 0.20 reported a single bundle's revision here
        else:
            self._revision = ""

    async def close(self) -> None:
        """Close the session if this engine made it; an injected session belongs to its owner."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None


def _error_message(payload: bytes) -> str:
    """OPA's ``message`` (and its first detailed error) from an error body, else the start of the raw body."""
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        message: str = body["message"]
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict) and errors[0].get("message"):
            first = errors[0]
            message += f": {first['code']}: {first['message']}" if first.get("code") else f": {first['message']}"
        return message[:_MESSAGE_LIMIT]
    text = payload.decode("utf-8", "replace").strip()
    return (text or "(empty body)")[:_MESSAGE_LIMIT]
