"""The reference answers: evaluate a decision with the real OPA engine (Go, via ``opa_bindings``) in its own process.

Run as ``python3 -m tests.opa_reference``; reads one JSON request on stdin::

    {"modules": [[name, text], ...], "data": {...}, "decision": "meshgate/authz/allow", "inputs": [{...}, ...]}

and writes one JSON answer on stdout: ``{"results": [{"defined": bool, "value": ...}, ...]}``, one per input, in
order (``{"defined": false, "error": "..."}`` for an input whose evaluation failed). A module OPA cannot load is
``{"error": "..."}`` with exit status 1.

Why a subprocess: ``opa_bindings`` loads a Go runtime into the process, and a process holding a Go runtime must not
fork, while the pytest process forks gateways. So nothing in the test process imports ``opa_bindings``; only this
script does.
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["evaluate", "main"]


def evaluate(request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request (see the module docstring); raises ``opa_bindings.OpaError`` on a load error."""
    import opa_bindings  # here, not at module level: importing this module must never load the Go runtime

    engine = opa_bindings.OpaEngine()
    try:
        for name, text in request["modules"]:
            engine.add_policy(name, text)
        engine.add_data(request.get("data") or {})
        # eval_document takes the dotted form of the path below data: meshgate/authz/allow -> meshgate.authz.allow
        path = ".".join(part for part in request["decision"].split("/") if part)
        results: list[dict[str, Any]] = []
        for document in request["inputs"]:
            try:
                results.append({"defined": True, "value": engine.eval_document(path, document)})
            except opa_bindings.OpaUndefinedError:
                results.append({"defined": False})
            except opa_bindings.OpaError as error:
                results.append({"defined": False, "error": f"{error.code}: {error.message}"})
        return {"results": results}
    finally:
        engine.close()


def main() -> int:
    import opa_bindings

    request = json.load(sys.stdin)
    try:
        answer = evaluate(request)
    except opa_bindings.OpaError as error:
        json.dump({"error": f"{error.code}: {error.message}"}, sys.stdout)
        return 1
    json.dump(answer, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
