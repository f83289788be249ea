"""An OPA server stand-in for tests: OPA's REST wire protocol in front of the real OPA engine (Go, in-process).

No OPA server binary exists on these machines, but the real OPA v1.20 evaluator does, as the Python module
``opa_bindings`` (package ``opa-golib-python-bindings``). This module puts a thin aiohttp server in front of it that
answers the parts of OPA's REST API that meshgate uses, with OPA's status codes and bodies::

    python3 -m tests.opa_server --listen 127.0.0.1:PORT [--bundle DIR] [--decision-ids] [--delay SECONDS]

    POST /v1/data/{path}       {"input": ...} -> 200 {"result": ...}, or 200 {} when undefined
    GET  /v1/data/{path}       the same without input (or with ?input=<JSON>)
    PUT  /v1/data/{path}       a JSON document -> 204; replaces the document at path
    GET  /v1/policies          200 {"result": [{"id", "raw"}, ...]}
    GET  /v1/policies/{id}     200 {"result": {"id", "raw"}} or 404
    PUT  /v1/policies/{id}     raw Rego -> 200 {}; 400 {"code": "invalid_parameter", "message", "errors": [...]}
    DELETE /v1/policies/{id}   200 {} or 404
    GET  /health               200 {}

Data API answers also carry ``decision_id`` with ``--decision-ids`` and ``provenance`` with ``?provenance=true``
(the ``.manifest`` revision of ``--bundle DIR`` under the bundle name ``DIR``, as ``opa run -s -b DIR`` reports it).
An evaluation error (e.g. a complete rule with two values) is a 500 with OPA's ``internal_error`` shape.

Test knobs, for the gateway's timeout and fail-closed paths (only Data API requests are affected; /health is not):

    --delay SECONDS / POST /_test/delay {"seconds": 0.5}       sleep this long before each decision
    POST /_test/answer {"status": 500, "body": "..."}          answer every decision with this raw status and body
    POST /_test/answer {}                                      back to real answers

Every change to policies or data rebuilds a fresh engine from all modules and the whole data document and
compiles it before the swap, so a rejected change leaves the previous state serving (as OPA's transactions do).

The Go runtime must never be forked: only the server process imports ``opa_bindings`` (lazily, in ``_new_engine``).
The helper ``opa_server()`` below, which the pytest process uses, starts the server with ``subprocess`` and never
imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.procs import ROOT, free_port, stop, wait_http

__all__ = ["OpaState", "StateError", "load_bundle_dir", "main", "make_app", "opa_server", "set_answer", "set_delay"]

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
    import opa_bindings  # type: ignore[import-not-found]  # deliberately late: see the module docstring

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


def _not_found(what: str) -> dict[str, Any]:
    return {"code": "resource_not_found", "message": f"storage_not_found_error: {what}"}


def _segments(request: web.Request) -> list[str]:
    return [seg for seg in request.match_info.get("path", "").split("/") if seg]


def _error(exc: StateError) -> web.Response:
    return web.json_response(exc.body, status=exc.status)


class Handlers:
    """The HTTP side: one method per endpoint, over one ``OpaState`` and the test knobs."""

    def __init__(self, state: OpaState, *, decision_ids: bool, delay: float) -> None:
        self.state = state
        self.decision_ids = decision_ids
        self.delay = delay
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


def make_app(state: OpaState, *, decision_ids: bool = False, delay: float = 0.0) -> web.Application:
    h = Handlers(state, decision_ids=decision_ids, delay=delay)
    app = web.Application()
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
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    state = OpaState()
    if args.bundle is not None:
        try:
            load_bundle_dir(state, args.bundle)
        except StateError as exc:
            sys.exit(f"opa_server: cannot load {args.bundle}: {json.dumps(exc.body)}")
    app = make_app(state, decision_ids=args.decision_ids, delay=args.delay)
    # A short shutdown_timeout: a request parked in --delay must not hold SIGTERM up for aiohttp's default 60 s.
    web.run_app(app, host=host, port=int(port), access_log=None, print=None, shutdown_timeout=0.5)


# -- the helper the pytest process uses (never imports opa_bindings) ------------------------------------------------


@contextmanager
def opa_server(
    bundle_dir: Path | None = None, *, delay: float = 0.0, decision_ids: bool = False, port: int | None = None
) -> Iterator[str]:
    """Start the stand-in on 127.0.0.1 at a free port, wait for /health, yield its base URL, stop it by PID."""
    port = port or free_port()
    command = [sys.executable, "-m", "tests.opa_server", "--listen", f"127.0.0.1:{port}", "--delay", str(delay)]
    if bundle_dir is not None:
        command += ["--bundle", str(bundle_dir)]
    if decision_ids:
        command.append("--decision-ids")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)  # stderr left to pytest's capture
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", process=process)
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
