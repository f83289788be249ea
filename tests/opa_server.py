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
what the file may say is in ``tests/opa_config.py`` (a config the stand-in cannot honour stops it at start), how
bundles are downloaded, polled, activated and reported by ``/health?bundles`` in ``tests/opa_bundles.py``.

Test knobs, for the gateway's timeout and fail-closed paths (only Data API requests are affected; /health is not):

    --delay SECONDS / POST /_test/delay {"seconds": 0.5}       sleep this long before each decision
    POST /_test/answer {"status": 500, "body": "..."}          answer every decision with this raw status and body
    POST /_test/answer {}                                      back to real answers

Policies, data and the engine live in ``tests/opa_state.py``: every change to policies or data rebuilds a fresh
engine from all modules and the whole data document and compiles it before the swap, so a rejected change leaves
the previous state serving (as OPA's transactions do).

The Go runtime must never be forked: only the server process imports ``opa_bindings`` (lazily, in
``opa_state._new_engine``, when ``main`` makes its ``OpaState``). The helper ``opa_server()`` below, which the pytest
process uses, starts the server with ``subprocess`` and never imports it; importing this module (and through it
``opa_state``, ``opa_config`` and ``opa_bundles``) loads no Go code. The bundle downloader runs on the server's own
event loop: no thread pool, no subprocess, no fork.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.opa_bundles import HEALTH_BUNDLES_ERROR, BundlePlugin
from tests.opa_config import BundleSource, ConfigFileError, read_config
from tests.opa_state import OpaState, StateError, load_bundle_dir, not_found
from tests.procs import ROOT, free_port, stop, wait_http

__all__ = ["Handlers", "main", "make_app", "opa_server", "set_answer", "set_delay"]

OPA_VERSION = "1.20.2"  # the engine opa-golib-python-bindings 0.4.4 embeds


# -- the server process ----------------------------------------------------------------------------------------------


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
            return web.json_response(not_found(f'policy id "{policy_id}"'), status=404)
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
