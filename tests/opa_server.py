"""An OPA server stand-in for tests: OPA's REST wire protocol in front of the real OPA engine (Go, in-process).

No OPA server binary exists on these machines, but the real OPA v1.20 evaluator does, as the Python module
``opa_bindings`` (package ``opa-golib-python-bindings``). This module puts a thin aiohttp server in front of it that
answers the parts of OPA's REST API that meshgate uses, with OPA's status codes and bodies::

    python3 -m tests.opa_server --listen 127.0.0.1:PORT [--bundle DIR] [--config-file FILE] [--decision-ids]
                                [--delay SECONDS]

    POST /v1/data/{path}       {"input": ...} -> 200 {"result": ...}, or 200 {} when undefined
    GET  /v1/data/{path}       the same without input (or with ?input=<JSON>)
    PUT  /v1/data/{path}       a JSON document -> 204; replaces the document at path
    GET  /v1/policies          200 {"result": [{"id", "raw"}, ...]}
    GET  /v1/policies/{id}     200 {"result": {"id", "raw"}} or 404
    PUT  /v1/policies/{id}     raw Rego -> 200 {}; 400 {"code": "invalid_parameter", "message", "errors": [...]}
    DELETE /v1/policies/{id}   200 {} or 404
    GET  /health               200 {}
    GET  /health?bundles       200 {} once every configured bundle is activated, else 500 {"error": ...}

Data API answers also carry ``decision_id`` with ``--decision-ids`` and ``provenance`` with ``?provenance=true``
(the ``.manifest`` revision of ``--bundle DIR`` under the bundle name ``DIR``, as ``opa run -s -b DIR`` reports it).
An evaluation error (e.g. a complete rule with two values) is a 500 with OPA's ``internal_error`` shape.

``--config-file FILE`` is OPA's own configuration file (YAML or JSON), of which the bundle plugin is implemented:
``services`` (a map or a list; ``url``, ``headers``, ``credentials: {bearer: {token | token_path, scheme}}``,
``response_header_timeout_seconds``) and ``bundles`` (``service``, ``resource``,
``polling: {min_delay_seconds, max_delay_seconds}``). What OPA does, this does:

- each bundle is downloaded at start, then again after a random delay between the polling bounds (OPA's defaults
  60 and 120 s; integers, as OPA's config types require), and after a failure with OPA's backoff (0.1 s growing
  by 1.6x, capped at the max delay, +-20% jitter);
- ``GET {service url}/{resource}`` (default ``bundles/<name>``) with ``Authorization: <scheme> <token>``, where a
  ``token_path`` file is read and stripped on every request (a rotated token is used at once), and
  ``If-None-Match`` with the ETag of the last download; 304 means unchanged, any status but 200/304 is an error;
- a downloaded bundle (a gzipped tarball, read by ``policy.bundle.load_bundle``) is activated in one step: its
  previous modules are removed, the data under its old and new manifest ``roots`` is erased, its modules (every
  ``.rego`` file, ``*_test.rego`` included, as OPA loads them; ids ``<bundle name>/<file>``) and data are written,
  and the whole is compiled before the swap. A bundle that does not parse or compile leaves the previous one
  serving, and the download cache falls back to the activated bundle's ETag (OPA's ``SetCache``), so the same
  broken bundle is fetched again and a fixed one gets through;
- roots of two bundles may not overlap; ``provenance`` reports ``{"bundles": {NAME: {"revision": ...}}}``;
- ``/health?bundles`` (also ``?bundles=true``) is 500 ``{"error": "one or more bundles are not activated"}`` until
  every configured bundle has been activated once (later failures do not make it unhealthy again, as in OPA).

Not implemented (refused at start, so a test never silently runs without them): bundle ``signing``,
``trigger: manual``, long polling, credentials other than ``bearer``, discovery and the legacy ``bundle`` key.
Other OPA sections (``decision_logs``, ``status``, ``labels``, ...) are accepted and ignored. Known differences
from OPA: a bundle without a manifest revision reports the loader's content revision (OPA reports ""), and a
bundle with no ``.rego`` file is refused (``load_bundle`` requires one; OPA accepts data-only bundles).
Download and activation outcomes are logged on stderr, one ``opa_server: bundle NAME: ...`` line each.

Test knobs, for the gateway's timeout and fail-closed paths (only Data API requests are affected; /health is not):

    --delay SECONDS / POST /_test/delay {"seconds": 0.5}       sleep this long before each decision
    POST /_test/answer {"status": 500, "body": "..."}          answer every decision with this raw status and body
    POST /_test/answer {}                                      back to real answers

Every change to policies or data rebuilds a fresh engine from all modules and the whole data document and
compiles it before the swap, so a rejected change leaves the previous state serving (as OPA's transactions do).

The Go runtime must never be forked: only the server process imports ``opa_bindings`` (lazily, in ``_new_engine``).
The helper ``opa_server()`` below, which the pytest process uses, starts the server with ``subprocess`` and never
imports it. The bundle downloader runs on the server's own event loop (aiohttp client, a temporary file for the
tarball): no thread pool, no subprocess, no fork.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import re
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from policy.bundle import Bundle, _check_package_root, load_bundle
from policy.engine import PolicyLoadError
from tests.procs import ROOT, free_port, stop, wait_http

__all__ = [
    "BundlePlugin",
    "BundleSource",
    "ConfigFileError",
    "OpaState",
    "Service",
    "StateError",
    "load_bundle_dir",
    "main",
    "make_app",
    "opa_server",
    "parse_config",
    "set_answer",
    "set_delay",
]

OPA_VERSION = "1.20.2"  # the engine opa-golib-python-bindings 0.4.4 embeds

# OPA's messages (server/types): parse and compile errors of a PUT policy share one message.
MSG_COMPILE_MODULE = "error(s) occurred while compiling module(s)"
MSG_EVALUATION = "error(s) occurred while evaluating query"

# The bindings flatten OPA's ast.Errors into text: "N error(s) occurred: file:row: code: message\n\tdetail...".
_ERROR_HEADER = re.compile(r"^(?:bundle activation failed: )?\d+ errors? occurred:\s*")
_ERROR_LINE = re.compile(r"^(?P<file>.+?):(?P<row>\d+): (?P<code>[a-z_]+): (?P<message>.*)$")


class StateError(Exception):
    """A change or a query OPA would refuse: ``status`` and an OPA error body (code, message, errors)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message", ""))
        self.status = status
        self.body = body


def _ast_errors(text: str, fallback_code: str) -> list[dict[str, Any]]:
    """OPA's ``errors`` array from the bindings' flattened error text (file and row; the column is not given)."""
    errors: list[dict[str, Any]] = []
    for line in _ERROR_HEADER.sub("", text).splitlines():
        match = _ERROR_LINE.match(line)
        if match is None:
            continue  # a "\t..." detail line showing the source under the error
        errors.append(
            {
                "code": match["code"],
                "message": match["message"],
                "location": {"file": match["file"], "row": int(match["row"])},
            }
        )
    return errors or [{"code": fallback_code, "message": text}]


def _new_engine(policies: dict[str, str], data: dict[str, Any]) -> Any:
    """A compiled engine over these modules and this data, or raise ``opa_bindings.OpaError``."""
    import opa_bindings  # type: ignore[import-not-found,import-untyped,unused-ignore]  # late: see the module docstring

    engine = opa_bindings.OpaEngine()
    try:
        for policy_id, raw in sorted(policies.items()):
            engine.add_policy(policy_id, raw)  # parse errors surface here
        if data:
            engine.add_data(data)
        engine.eval_query("true")  # compile errors (types, safety, rule/data conflicts) only surface on first eval
    except BaseException:
        engine.close()
        raise
    return engine


def _ref(segments: list[str]) -> str:
    """A Rego ref to ``data`` at these URL path segments; integers index arrays, as OPA's stringPathToRef does."""
    return "data" + "".join(f"[{seg}]" if seg.isdigit() else f"[{json.dumps(seg)}]" for seg in segments)


class OpaState:
    """Policies, data and the engine compiled from them; every change swaps in a freshly built engine."""

    def __init__(self) -> None:
        self.policies: dict[str, str] = {}
        self.data: dict[str, Any] = {}
        self.revisions: dict[str, str] = {}  # bundle name -> .manifest revision, for provenance
        self.bundle_modules: dict[str, frozenset[str]] = {}  # bundle name -> policy ids its activation wrote
        self.bundle_roots: dict[str, tuple[str, ...]] = {}  # bundle name -> its manifest roots ("" = everything)
        self._engine: Any = _new_engine({}, {})

    def _swap(self, policies: dict[str, str], data: dict[str, Any]) -> None:
        import opa_bindings

        try:
            engine = _new_engine(policies, data)
        except opa_bindings.OpaError as exc:
            errors = _ast_errors(exc.message, "rego_compile_error")
            raise StateError(
                400, {"code": "invalid_parameter", "message": MSG_COMPILE_MODULE, "errors": errors}
            ) from None
        old, self._engine = self._engine, engine
        self.policies, self.data = policies, data
        old.close()

    def put_policy(self, policy_id: str, raw: str) -> None:
        if not raw.strip():
            raise StateError(400, {"code": "invalid_parameter", "message": "empty module"})
        self._swap({**self.policies, policy_id: raw}, self.data)

    def delete_policy(self, policy_id: str) -> None:
        if policy_id not in self.policies:
            raise StateError(404, _not_found(f'policy id "{policy_id}"'))
        self._swap({k: v for k, v in self.policies.items() if k != policy_id}, self.data)

    def put_data(self, segments: list[str], value: Any) -> None:
        if not segments:
            if not isinstance(value, dict):
                raise StateError(400, {"code": "invalid_parameter", "message": "root document must be an object"})
            self._swap(self.policies, value)
            return
        data = json.loads(json.dumps(self.data))  # a deep copy: a rejected change must leave self.data as it was
        node = data
        for seg in segments[:-1]:
            child = node.get(seg)
            if not isinstance(child, dict):
                child = node[seg] = {}
            node = child
        node[segments[-1]] = value
        self._swap(self.policies, data)

    def activate_bundle(self, name: str, bundle: Bundle) -> None:
        """Make ``bundle`` the active bundle ``name`` in one swap, as OPA's bundle plugin does; ``StateError`` (and
        nothing changed) when its roots overlap another bundle's or the result does not compile."""
        for other, roots in sorted(self.bundle_roots.items()):
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
        previous = self.bundle_modules.get(name, frozenset())
        modules = {f"{name}/{file}": text for file, text in (*bundle.modules, *bundle.tests)}
        policies = {pid: raw for pid, raw in self.policies.items() if pid not in previous}
        policies.update(modules)
        data = copy.deepcopy(self.data)
        # The old roots too: a revision that drops a root must not leave that root's old data behind.
        for root in sorted({*self.bundle_roots.get(name, ()), *bundle.roots}):
            _erase(data, root)
        _merge(data, bundle.data)
        self._swap(policies, data)
        self.bundle_modules[name] = frozenset(modules)
        self.bundle_roots[name] = bundle.roots
        self.revisions[name] = bundle.revision

    def evaluate(self, segments: list[str], input: Any, has_input: bool) -> tuple[bool, Any]:
        """``(defined, value)`` of the document at ``data/<segments>``; OPA's 500 body on an evaluation error."""
        import opa_bindings

        try:
            rows = self._engine.eval_query(f"x := {_ref(segments)}", input if has_input else None)
        except opa_bindings.OpaError as exc:
            errors = _ast_errors(exc.message, exc.code)
            raise StateError(500, {"code": "internal_error", "message": MSG_EVALUATION, "errors": errors}) from None
        if not rows:
            return False, None
        return True, rows[0]["x"]


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


def _not_found(what: str) -> dict[str, Any]:
    return {"code": "resource_not_found", "message": f"storage_not_found_error: {what}"}


def _segments(request: web.Request) -> list[str]:
    return [seg for seg in request.match_info.get("path", "").split("/") if seg]


def _error(exc: StateError) -> web.Response:
    return web.json_response(exc.body, status=exc.status)


class Handlers:
    """The HTTP side: one method per endpoint, over one ``OpaState`` and the test knobs."""

    def __init__(
        self, state: OpaState, *, decision_ids: bool, delay: float, plugin: BundlePlugin | None = None
    ) -> None:
        self.state = state
        self.decision_ids = decision_ids
        self.delay = delay
        self.plugin = plugin
        self.answer: tuple[int, str] | None = None

    async def _decide(self, request: web.Request, input: Any, has_input: bool) -> web.Response:
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        if self.answer is not None:
            status, body = self.answer
            return web.Response(status=status, text=body, content_type="application/json")
        try:
            defined, value = self.state.evaluate(_segments(request), input, has_input)
        except StateError as exc:
            return _error(exc)
        response: dict[str, Any] = {"result": value} if defined else {}
        if request.method == "POST" and not has_input:
            # What OPA adds when a POST carries no "input" key: usually a client bug.
            response["warning"] = {"code": "api_usage_warning", "message": "'input' key missing from the request"}
        if self.decision_ids:
            response["decision_id"] = str(uuid.uuid4())
        if request.query.get("provenance", "").lower() == "true":
            response["provenance"] = {
                "version": OPA_VERSION,
                "build_commit": "",
                "build_timestamp": "",
                "build_hostname": "",
                **(
                    {"bundles": {n: {"revision": r} for n, r in self.state.revisions.items()}}
                    if self.state.revisions
                    else {}
                ),
            }
        return web.json_response(response)

    async def data_post(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body: Any = {}
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError as exc:
                return web.json_response(
                    {"code": "invalid_parameter", "message": f"body contains malformed input document: {exc}"},
                    status=400,
                )
        if not isinstance(body, dict):
            return web.json_response({"code": "invalid_parameter", "message": "body must be an object"}, status=400)
        return await self._decide(request, body.get("input"), "input" in body)

    async def data_get(self, request: web.Request) -> web.Response:
        if "input" in request.query:
            try:
                return await self._decide(request, json.loads(request.query["input"]), True)
            except ValueError as exc:
                return web.json_response({"code": "invalid_parameter", "message": str(exc)}, status=400)
        return await self._decide(request, None, False)

    async def data_put(self, request: web.Request) -> web.Response:
        try:
            value = json.loads(await request.read())
        except ValueError as exc:
            return web.json_response({"code": "invalid_parameter", "message": str(exc)}, status=400)
        try:
            self.state.put_data(_segments(request), value)
        except StateError as exc:
            return _error(exc)
        return web.Response(status=204)

    async def policies_list(self, request: web.Request) -> web.Response:
        result = [{"id": pid, "raw": raw} for pid, raw in sorted(self.state.policies.items())]
        return web.json_response({"result": result})

    async def policy_get(self, request: web.Request) -> web.Response:
        policy_id = request.match_info["id"]
        if policy_id not in self.state.policies:
            return web.json_response(_not_found(f'policy id "{policy_id}"'), status=404)
        return web.json_response({"result": {"id": policy_id, "raw": self.state.policies[policy_id]}})

    async def policy_put(self, request: web.Request) -> web.Response:
        try:
            self.state.put_policy(request.match_info["id"], await request.text())
        except StateError as exc:
            return _error(exc)
        return web.json_response({})

    async def policy_delete(self, request: web.Request) -> web.Response:
        try:
            self.state.delete_policy(request.match_info["id"])
        except StateError as exc:
            return _error(exc)
        return web.json_response({})

    async def health(self, request: web.Request) -> web.Response:
        # OPA's getBoolParam: "?bundles" alone is true, otherwise only a value "true" (any case) is.
        values = request.query.getall("bundles", [])
        check_bundles = values == [""] or any(value.lower() == "true" for value in values)
        if check_bundles and self.plugin is not None and not self.plugin.ready():
            return web.json_response({"error": HEALTH_BUNDLES_ERROR}, status=500)
        return web.json_response({})

    async def test_delay(self, request: web.Request) -> web.Response:
        self.delay = float((await request.json()).get("seconds", 0.0))
        return web.json_response({"seconds": self.delay})

    async def test_answer(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.answer = (int(body["status"]), str(body.get("body", ""))) if "status" in body else None
        return web.json_response({"answer": body})


def load_bundle_dir(state: OpaState, bundle_dir: Path) -> None:
    """Load ``*.rego`` (not ``*_test.rego``; id = relative path) and every ``data.json`` at its directory's path."""
    policies = {
        path.relative_to(bundle_dir).as_posix(): path.read_text()
        for path in sorted(bundle_dir.rglob("*.rego"))
        if not path.name.endswith("_test.rego")
    }
    data: dict[str, Any] = {}
    for path in sorted(bundle_dir.rglob("data.json")):
        node = data
        for seg in path.parent.relative_to(bundle_dir).parts:
            node = node.setdefault(seg, {})
        node.update(json.loads(path.read_text()))
    state._swap(policies, data)
    manifest = bundle_dir / ".manifest"
    if manifest.is_file():
        revision = json.loads(manifest.read_text()).get("revision", "")
        state.revisions = {str(bundle_dir): str(revision)}


# -- OPA's bundle plugin: bundles downloaded from a bundle service, as configured in OPA's config file ------------

DEFAULT_MIN_DELAY = 60  # OPA's polling defaults, seconds (download.PollingConfig)
DEFAULT_MAX_DELAY = 120
MIN_RETRY_DELAY = 0.1  # OPA's first retry delay after a failed download, before the 1.6x backoff
DEFAULT_RESPONSE_HEADER_TIMEOUT = 10  # OPA's services.*.response_header_timeout_seconds default
HEALTH_BUNDLES_ERROR = "one or more bundles are not activated"  # OPA's /health?bundles message

# Sections OPA accepts that change nothing about bundle downloads: accepted and ignored.
_IGNORED_SECTIONS = frozenset(
    {
        "labels",
        "decision_logs",
        "status",
        "default_decision",
        "default_authorization_decision",
        "keys",
        "caching",
        "distributed_tracing",
        "server",
        "storage",
        "persistence_directory",
        "nd_builtin_cache",
        "plugins",
    }
)
_SERVICE_KEYS = frozenset(
    {"name", "url", "headers", "credentials", "response_header_timeout_seconds", "allow_insecure_tls", "type", "tls"}
)
_BUNDLE_KEYS = frozenset({"service", "resource", "polling", "persist", "size_limit_bytes", "trigger", "signing"})


class ConfigFileError(Exception):
    """An OPA config this stand-in cannot run as OPA would: invalid for OPA, or using what is not implemented."""


@dataclass(frozen=True, slots=True)
class Service:
    """One entry of OPA's ``services``: where bundles come from and how requests authenticate."""

    name: str
    url: str
    headers: dict[str, str]
    bearer: bool  # credentials.bearer configured: every request carries "<scheme> <token>"
    token: str
    token_path: str | None
    scheme: str
    timeout: int  # seconds; OPA's bound on the response headers, applied to the whole download here

    def authorization(self) -> str | None:
        """The Authorization value for the next request. Like OPA's bearer plugin, ``token_path`` is read and
        stripped on every request (``OSError`` when it cannot be read: that download fails)."""
        if not self.bearer:
            return None
        token = Path(self.token_path).read_text().strip() if self.token_path is not None else self.token
        return f"{self.scheme} {token}"


@dataclass(frozen=True, slots=True)
class BundleSource:
    """One entry of OPA's ``bundles``."""

    name: str
    service: Service
    resource: str
    min_delay: int
    max_delay: int

    @property
    def url(self) -> str:
        return f"{self.service.url.rstrip('/')}/{self.resource.lstrip('/')}"


def _object(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigFileError(f"{where}: must be an object")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigFileError(f"{where}: must be a string")
    return value


def _integer(value: object, where: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):  # OPA's *int64: 0.5 does not unmarshal
        raise ConfigFileError(f"{where}: must be an integer number of seconds, not {value!r}")
    return value


def _warn_unknown(section: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    for key in sorted(set(section) - known):
        name = f"{where}.{key}" if where else key
        _log(f"config: {name}: not an OPA setting this stand-in knows; ignored (OPA ignores unknown keys too)")


def _service(name: str, raw: object) -> Service:
    where = f"services.{name}"
    section = _object(raw, where)
    _warn_unknown(section, _SERVICE_KEYS, where)
    if "url" not in section:
        raise ConfigFileError(f"{where}.url: required")
    url = _string(section["url"], f"{where}.url").rstrip("/")
    raw_headers = _object(section.get("headers"), f"{where}.headers")
    headers = {str(k): _string(v, f"{where}.headers.{k}") for k, v in raw_headers.items()}
    timeout = _integer(
        section.get("response_header_timeout_seconds"),
        f"{where}.response_header_timeout_seconds",
        DEFAULT_RESPONSE_HEADER_TIMEOUT,
    )
    credentials = _object(section.get("credentials"), f"{where}.credentials")
    other = sorted(set(credentials) - {"bearer"})
    if other:
        raise ConfigFileError(f"{where}.credentials.{other[0]}: not implemented by the stand-in (only bearer)")
    bearer = "bearer" in credentials
    settings = _object(credentials.get("bearer"), f"{where}.credentials.bearer")
    token = _string(settings.get("token", ""), f"{where}.credentials.bearer.token")
    token_path = settings.get("token_path")
    if token_path is not None:
        token_path = _string(token_path, f"{where}.credentials.bearer.token_path")
        if token:
            # OPA's own message (bearerAuthPlugin.NewClient).
            raise ConfigFileError('invalid config: specify a value for either the "token" or "token_path" field')
    scheme = _string(settings.get("scheme") or "Bearer", f"{where}.credentials.bearer.scheme")
    return Service(name, url, headers, bearer, token, token_path, scheme, timeout)


def _services(raw: object) -> dict[str, Service]:
    """OPA's ``services``: a map of name -> settings, or a list of settings each with a ``name``; in file order."""
    if isinstance(raw, list):
        pairs = []
        for index, entry in enumerate(raw):
            name = _object(entry, f"services[{index}]").get("name")
            pairs.append((_string(name, f"services[{index}].name"), entry))
    else:
        pairs = list(_object(raw, "services").items())
    return {str(name): _service(str(name), entry) for name, entry in pairs}


def parse_config(document: object) -> list[BundleSource]:
    """The bundles an OPA config file configures, or ``ConfigFileError`` (see the module docstring)."""
    top = _object(document, "the config file")
    for key in ("bundle", "discovery"):
        if key in top:
            raise ConfigFileError(f"{key}: not implemented by the stand-in (use 'bundles')")
    _warn_unknown(top, _IGNORED_SECTIONS | {"services", "bundles"}, "")
    services = _services(top.get("services"))
    sources = []
    for name, raw in _object(top.get("bundles"), "bundles").items():
        where = f"bundles.{name}"
        section = _object(raw, where)
        _warn_unknown(section, _BUNDLE_KEYS, where)
        if section.get("signing") is not None:
            raise ConfigFileError(f"{where}.signing: not implemented by the stand-in")
        if section.get("trigger", "periodic") != "periodic":
            raise ConfigFileError(f"{where}.trigger: only periodic is implemented by the stand-in")
        service_name = section.get("service")
        if service_name is None or service_name == "":
            if not services:
                raise ConfigFileError(f"{where}: no services configured to download it from")
            service_name = next(iter(services))  # OPA: the first service when none is named
        service_name = _string(service_name, f"{where}.service")
        if service_name not in services:
            raise ConfigFileError(f'invalid service name "{service_name}" in bundle "{name}"')  # OPA's wording
        resource = _string(section.get("resource") or f"bundles/{name}", f"{where}.resource")
        polling = _object(section.get("polling"), f"{where}.polling")
        if polling.get("long_polling_timeout_seconds") is not None:
            raise ConfigFileError(f"{where}.polling.long_polling_timeout_seconds: not implemented by the stand-in")
        low = _integer(polling.get("min_delay_seconds"), f"{where}.polling.min_delay_seconds", DEFAULT_MIN_DELAY)
        high = _integer(polling.get("max_delay_seconds"), f"{where}.polling.max_delay_seconds", DEFAULT_MAX_DELAY)
        if high < low:
            raise ConfigFileError("max polling delay must be >= min polling delay")  # OPA's wording
        sources.append(BundleSource(str(name), services[service_name], resource, low, high))
    return sources


def read_config(path: Path) -> list[BundleSource]:
    try:
        document = yaml.safe_load(path.read_text())  # YAML is a superset of JSON: OPA accepts both too
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"cannot read: {exc}") from None
    return parse_config(document)


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
            self.state.activate_bundle(source.name, bundle)
        except StateError as exc:
            return self._failed(source.name, f"activation failed: {_error_text(exc)}")
        status.etag = status.activated_etag = etag
        status.activated, status.revision, status.error = True, bundle.revision, ""
        _log(f"bundle {source.name}: activated revision {bundle.revision!r} (etag {etag or 'none'})")
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
        _log(f"bundle {name}: {error}")
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


def _log(message: str) -> None:
    print(f"opa_server: {message}", file=sys.stderr, flush=True)


def make_app(
    state: OpaState, *, decision_ids: bool = False, delay: float = 0.0, plugin: BundlePlugin | None = None
) -> web.Application:
    h = Handlers(state, decision_ids=decision_ids, delay=delay, plugin=plugin)
    app = web.Application()
    if plugin is not None:
        app.on_startup.append(plugin.start)
        app.on_cleanup.append(plugin.stop)
    app.router.add_get("/health", h.health)
    for path in ("/v1/data", "/v1/data/{path:.*}"):
        app.router.add_post(path, h.data_post)
        app.router.add_get(path, h.data_get)
        app.router.add_put(path, h.data_put)
    app.router.add_get("/v1/policies", h.policies_list)
    app.router.add_get("/v1/policies/{id:.+}", h.policy_get)
    app.router.add_put("/v1/policies/{id:.+}", h.policy_put)
    app.router.add_delete("/v1/policies/{id:.+}", h.policy_delete)
    app.router.add_post("/_test/delay", h.test_delay)
    app.router.add_post("/_test/answer", h.test_answer)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m tests.opa_server", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8181", help="host:port")
    parser.add_argument("--bundle", type=Path, help="preload *.rego and data.json files from this directory")
    parser.add_argument("--decision-ids", action="store_true", help="add decision_id to Data API answers")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each decision")
    parser.add_argument(
        "--config-file", type=Path, help="OPA's config file: download and activate the bundles it configures"
    )
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    sources: list[BundleSource] | None = None
    if args.config_file is not None:
        try:
            sources = read_config(args.config_file)
        except ConfigFileError as exc:
            sys.exit(f"opa_server: {args.config_file}: {exc}")
    state = OpaState()
    if args.bundle is not None:
        try:
            load_bundle_dir(state, args.bundle)
        except StateError as exc:
            sys.exit(f"opa_server: cannot load {args.bundle}: {json.dumps(exc.body)}")
    plugin = BundlePlugin(state, sources) if sources is not None else None
    app = make_app(state, decision_ids=args.decision_ids, delay=args.delay, plugin=plugin)
    # A short shutdown_timeout: a request parked in --delay must not hold SIGTERM up for aiohttp's default 60 s.
    web.run_app(app, host=host, port=int(port), access_log=None, print=None, shutdown_timeout=0.5)


# -- the helper the pytest process uses (never imports opa_bindings) ------------------------------------------------


@contextmanager
def opa_server(
    bundle_dir: Path | None = None,
    *,
    delay: float = 0.0,
    decision_ids: bool = False,
    port: int | None = None,
    config_file: Path | None = None,
    wait_for_bundles: bool = False,
    log_path: Path | None = None,
    ready_timeout: float = 15.0,
) -> Iterator[str]:
    """Start the stand-in on 127.0.0.1 at a free port, wait for /health (``/health?bundles`` with
    ``wait_for_bundles``), yield its base URL, stop it by PID. ``config_file``: OPA's config file (bundle
    downloads); ``log_path``: where its stderr goes (else pytest's capture)."""
    port = port or free_port()
    command = [sys.executable, "-m", "tests.opa_server", "--listen", f"127.0.0.1:{port}", "--delay", str(delay)]
    if bundle_dir is not None:
        command += ["--bundle", str(bundle_dir)]
    if config_file is not None:
        command += ["--config-file", str(config_file)]
    if decision_ids:
        command.append("--decision-ids")
    with ExitStack() as files:  # the child holds its own copy of the log's descriptor
        stderr = files.enter_context(log_path.open("ab")) if log_path is not None else None
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health?bundles" if wait_for_bundles else f"{url}/health", ready_timeout, process=process)
        yield url
    finally:
        stop(process)


def _post_json(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


def set_delay(url: str, seconds: float) -> None:
    """Make the stand-in at ``url`` wait ``seconds`` before each decision (0 to stop)."""
    _post_json(f"{url}/_test/delay", {"seconds": seconds})


def set_answer(url: str, status: int | None, body: str = "") -> None:
    """Make the stand-in answer every decision with ``status`` and the raw ``body``; ``None`` restores real answers."""
    _post_json(f"{url}/_test/answer", {} if status is None else {"status": status, "body": body})


if __name__ == "__main__":
    main()
