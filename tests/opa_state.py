"""The OPA stand-in's store: policies, data and the real OPA engine (Go, in-process) compiled from them.

The engine is OPA v1.20's own evaluator, the Python module ``opa_bindings`` (package
``opa-golib-python-bindings``). Every change to policies or data rebuilds a fresh engine from all modules and the
whole data document and compiles it before the swap, so a rejected change leaves the previous state serving (as
OPA's transactions do). A rejected change or a failed query is a ``StateError`` carrying OPA's status and error
body; ``tests/opa_server.py`` answers with them as they are. Bundles are activated through ``swap`` by
``tests/opa_bundles.py``, which keeps its bookkeeping (``revisions``, ``bundle_modules``, ``bundle_roots``) here.

The Go runtime must never be forked: ``opa_bindings`` is imported lazily, in ``_new_engine``, so importing this
module loads no Go code; only the server process (``python -m tests.opa_server``) makes an ``OpaState``, never the
pytest process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["MSG_COMPILE_MODULE", "MSG_EVALUATION", "OpaState", "StateError", "load_bundle_dir", "not_found"]

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

    def swap(self, policies: dict[str, str], data: dict[str, Any]) -> None:
        """Make these modules and this data the state, compiled into a fresh engine; ``StateError`` (400, OPA's
        compile error body) and nothing changed when they do not compile."""
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
        self.swap({**self.policies, policy_id: raw}, self.data)

    def delete_policy(self, policy_id: str) -> None:
        if policy_id not in self.policies:
            raise StateError(404, not_found(f'policy id "{policy_id}"'))
        self.swap({k: v for k, v in self.policies.items() if k != policy_id}, self.data)

    def put_data(self, segments: list[str], value: Any) -> None:
        if not segments:
            if not isinstance(value, dict):
                raise StateError(400, {"code": "invalid_parameter", "message": "root document must be an object"})
            self.swap(self.policies, value)
            return
        data = json.loads(json.dumps(self.data))  # a deep copy: a rejected change must leave self.data as it was
        node = data
        for seg in segments[:-1]:
            child = node.get(seg)
            if not isinstance(child, dict):
                child = node[seg] = {}
            node = child
        node[segments[-1]] = value
        self.swap(self.policies, data)

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


def not_found(what: str) -> dict[str, Any]:
    return {"code": "resource_not_found", "message": f"storage_not_found_error: {what}"}


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
    state.swap(policies, data)
    manifest = bundle_dir / ".manifest"
    if manifest.is_file():
        revision = json.loads(manifest.read_text()).get("revision", "")
        state.revisions = {str(bundle_dir): str(revision)}
