"""``EmbeddedEngine``: a bundle's decision rule evaluated in-process by regorus (Rust), the ``embedded`` engine.

Loading checks what OPA would refuse, and what regorus would only find out per request, all at once: every module
parses (with the bundle's ``rego_version``); every function called exists (a built-in regorus has, or a function
in the bundle), since regorus reports an unknown one only when it is evaluated; the static checks regorus runs
before a first evaluation pass (unsafe variables, arity clashes...); the decision's package and rule exist. Each
problem is one ``file:line: problem`` line of ``PolicyLoadError``.

Evaluation path, measured (Python 3.11, this machine, the opa-envoy style policy of the unit tests with a
700-byte input, median of 9 x 20,000 calls):

- ``Engine.set_input(dict)`` + ``eval_rule``: 8.4 + 14.3 = ~23 us per decision (chosen);
- ``Engine.set_input_json(json.dumps(...))`` + ``eval_rule``: 7.0 + 8.7 + 14.3 = ~31 us;
- compiled ``Program`` + ``Rvm.execute_entry_point``: 7.0 (json.dumps) + 8.7 (``set_input_json``) + 5.8 = ~23 us,
  ~16 us with orjson. Not used: its compiler cannot parse v0 modules and rejects ``with``, ``print`` and partial
  object rules with constant keys, so it cannot serve every bundle the interpreter serves. Its compile step is
  also no load check: it sees only the rules the entry point reaches, stops at the first unknown function, and
  accepts ``http.send``, which regorus only stubs (always undefined).

``eval_rule`` answers ``None`` both for an undefined rule and for ``null``. Most decision rules cannot be ``null``
(every value they define is a literal, a comparison, a set or an object): for them ``None`` is ``UNDEFINED``. For a
rule that may be ``null`` the rule is asked again with ``eval_query`` on ``None``, which doubles that call's cost.
Measured through ``evaluate_sync``: the envoy example 23 us (allowed, denied or undefined; 43 us undefined if it
had to ask twice); the shipped ``policy/rego`` bundle (object result, sprintf reasons) ~75 us.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from functools import cache
from typing import Any, Final

from policy.bundle import Bundle
from policy.engine import UNDEFINED, PolicyError, PolicyLoadError, rule_path
from policy.input_refs import InputPath, input_refs
from policy.rego_ast import Module, calls, kind, modules_of, rule_head

# This machine sets RUST_BACKTRACE=1, which appends a Rust backtrace to every regorus error message. Set before the
# extension loads: Rust reads the variable when an error is created, from the process environment.
os.environ["RUST_BACKTRACE"] = "0"
import regorus  # type: ignore[import-untyped]

__all__ = ["EmbeddedEngine", "available_builtins"]

# Built-ins regorus lists but only stubs: a policy using them would silently be undefined here and not in OPA.
_STUBBED: Final = frozenset({"http.send"})
# Supported by the interpreter though not listed by opa.runtime().
_UNLISTED: Final = frozenset({"print"})

_LOCATION = re.compile(r"-->\s*(?P<file>.+?):(?P<line>\d+):\d+")
_PROBLEM = re.compile(r"^\s*error:\s*(?P<message>.+?)\s*$", re.MULTILINE)


@cache
def available_builtins() -> frozenset[str]:
    """The built-ins the embedded engine can evaluate (regorus' own list, as ``opa.runtime()`` reports it)."""
    engine = regorus.Engine()
    listed = engine.eval_query("opa.runtime().builtins")["result"][0]["expressions"][0]["value"]
    return frozenset(str(name) for name in listed if not str(name).startswith("__")) - _STUBBED | _UNLISTED


class EmbeddedEngine:
    """One bundle, one decision rule (``meshgate/authz/allow``), evaluated by regorus in this process.

    ``input_refs`` holds every path under ``input`` the policy can read (``policy/input_refs.py``): the decision
    cache keys on them. Not thread-safe (regorus keeps the input in the engine); one event loop per process.
    """

    name: Final = "embedded"

    def __init__(self, bundle: Bundle, decision: str) -> None:
        self.bundle: Final = bundle
        self.decision: Final = decision
        self._rule = ".".join(("data", *rule_path(decision)))
        self._engine: Any = regorus.Engine()  # None once closed
        self._engine.set_rego_v0(bundle.rego_version == 0)
        problems: list[str] = []
        for file, text in bundle.modules:
            try:
                self._engine.add_policy(file, text)
            except RuntimeError as error:
                problems.append(_one_line(str(error), file, parse=True))
        _raise(problems)
        modules = modules_of(self._engine.get_ast_as_json())
        _raise(_call_problems(modules))
        self._engine.add_data(bundle.data)
        try:
            self._engine.eval_query("true")  # runs regorus' static checks over every module now, not on a request
        except RuntimeError as error:
            _raise([_one_line(str(error))])
        _raise(_decision_problems(modules, rule_path(decision)))
        self.input_refs: Final[frozenset[InputPath]] = input_refs(modules, rule_path(decision))
        # Built-ins the bundle calls: a decision that depends on the clock or on randomness must not be cached.
        self.builtins_called: Final[frozenset[str]] = (
            frozenset(call.name for module in modules for call in calls(list(module.rules))) & available_builtins()
        )
        self._may_be_null = _may_be_null(modules, rule_path(decision))

    @property
    def revision(self) -> str:
        return self.bundle.revision

    def evaluate_sync(self, input: Mapping[str, Any]) -> object:
        """The decision rule's value for ``input`` (JSON types), ``UNDEFINED``, or ``PolicyError``."""
        engine = self._engine
        if engine is None:
            raise PolicyError("embedded policy evaluation failed: the engine is closed")
        try:
            # set_input converts the dict directly: as fast as set_input_json and no json.dumps (see docstring).
            engine.set_input(input)
            value = engine.eval_rule(self._rule)
            if value is None and (not self._may_be_null or not engine.eval_query(self._rule)["result"]):
                return UNDEFINED
        except (RuntimeError, TypeError, ValueError, OverflowError) as error:
            raise PolicyError(f"embedded policy evaluation failed: {_one_line(str(error))}") from None
        return value if isinstance(value, bool) else _as_json(value)

    async def evaluate(self, input: Mapping[str, Any]) -> object:
        """As ``evaluate_sync``: regorus answers in microseconds, so the event loop is not handed off."""
        return self.evaluate_sync(input)

    async def close(self) -> None:
        # regorus' engine may only be freed on the thread that made it (the event loop's). Dropped here, on that
        # thread: this object may end in a reference cycle whose collection runs on a worker thread (asyncio.to_thread),
        # where dropping the engine fails ("unsendable") and leaks it.
        self._engine = None


def _as_json(value: object) -> object:
    """Rego sets come back as Python sets; OPA answers them as arrays in Rego's order, and so does this engine."""
    if isinstance(value, dict):
        return {key: _as_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_json(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted((_as_json(item) for item in value), key=_rego_order)
    return value


def _rego_order(value: object) -> tuple[int, Any]:
    """Rego orders values null < boolean < number < string < array < object (set members are JSON by now)."""
    if value is None:
        return 0, 0
    if isinstance(value, bool):
        return 1, value
    if isinstance(value, int | float):
        return 2, value
    if isinstance(value, str):
        return 3, value
    return (4 if isinstance(value, list) else 5), json.dumps(value, sort_keys=True)


# --------------------------------------------------------------------------------------------- load checks


def _call_problems(modules: tuple[Module, ...]) -> list[str]:
    """Calls of functions neither regorus nor the bundle defines, each with its file and line."""
    functions: set[tuple[str, ...]] = set()
    for module in modules:
        for rule in module.rules:
            head_kind, _, steps = rule_head(rule)
            if head_kind == "Func" and all(isinstance(step, str) for step in steps):
                functions.add((*module.package, *map(str, steps)))
    builtins = available_builtins()
    problems: list[str] = []
    for module in modules:
        for call in calls(list(module.rules)):
            where = f"{module.file}:{call.line}"
            imported = module.imports.get(call.root)
            if call.root == "data" or (imported is not None and imported[0] == "data"):
                path = (*(imported[1:] if imported else ()), *call.segments)
                if path not in functions:
                    problems.append(f"{where}: function data.{'.'.join(path)} is not defined in the bundle")
            elif (*module.package, call.root, *call.segments) in functions or call.name in builtins:
                continue
            else:
                problems.append(
                    f"{where}: built-in {call.name} is not available in the embedded engine ({_hint(call.name)})"
                )
    return list(dict.fromkeys(problems))


def _hint(name: str) -> str:
    if name.startswith("io.jwt."):
        return "use input.meshgate.principal, which holds the verified JWT claims, or authz.engine: opa"
    if name in _STUBBED:
        return "regorus only stubs it, it would always be undefined; use authz.engine: opa"
    return "use authz.engine: opa if OPA has it"


def _decision_problems(modules: tuple[Module, ...], decision: tuple[str, ...]) -> list[str]:
    packages = {module.package for module in modules}
    package = next((decision[:n] for n in range(len(decision) - 1, 0, -1) if decision[:n] in packages), None)
    shown = "/".join(decision)
    if package is None:
        listed = ", ".join(sorted(".".join(p) for p in packages))
        return [f"decision {shown}: package {'.'.join(decision[:-1])} is not in the bundle (its packages: {listed})"]
    rules: dict[tuple[str, ...], str] = {}
    for module in modules:
        if module.package != package:
            continue
        for rule in module.rules:
            head_kind, _, steps = rule_head(rule)
            names = tuple(step if isinstance(step, str) else "[_]" for step in steps)
            if head_kind != "Default" or names not in rules:
                rules[names] = head_kind
    wanted = decision[len(package) :]
    if rules.get(wanted) == "Func":
        return [f"decision {shown}: {'.'.join(wanted)} is a function, not a rule"]
    if wanted not in rules and (*wanted, "[_]") not in rules:
        listed = ", ".join(sorted({".".join(name).replace(".[_]", "[_]") for name in rules}))
        return [f"decision {shown}: package {'.'.join(package)} has no rule {'.'.join(wanted)} (its rules: {listed})"]
    return []


# Value expressions that can never evaluate to null.
_NOT_NULL: Final = frozenset(
    {"Bool", "Number", "String", "RawString", "Array", "Set", "Object", "ArrayCompr", "SetCompr", "ObjectCompr"}
    | {"BoolExpr", "Membership", "ArithExpr"}
)


def _may_be_null(modules: tuple[Module, ...], decision: tuple[str, ...]) -> bool:
    """Whether some definition of the decision rule may give it the value ``null`` (see the module docstring)."""
    for module in modules:
        for rule in module.rules:
            head_kind, head, steps = rule_head(rule)
            if (*module.package, *steps) != decision or head is None:
                continue  # partial object rules (a non-constant step) and set rules are never null
            if head_kind == "Default":
                values = [head["value"]]
            elif head_kind == "Compr":
                bodies = kind(rule)[1].get("bodies") or []
                values = [(head.get("assign") or {}).get("value")]
                values += [body["assign"]["value"] for body in bodies if body.get("assign")]
            else:
                continue
            if any(value is not None and kind(value)[0] not in _NOT_NULL for value in values):
                return True
    return False


def _raise(problems: list[str]) -> None:
    if problems:
        raise PolicyLoadError("\n".join(problems))


def _one_line(message: str, file: str | None = None, *, parse: bool = False) -> str:
    """regorus' error (``--> file:line:col``, a source excerpt, ``error: problem``, ``Caused by:``...) as one
    ``file:line: problem`` line; the innermost location and problem win, as they are the precise ones."""
    main = message.split("Caused by:", 1)[0]
    locations = list(_LOCATION.finditer(main))
    problems = list(_PROBLEM.finditer(main))
    problem = problems[-1].group("message") if problems else " ".join(main.split())
    problem = problem.removeprefix("Compilation error:").strip() or " ".join(main.split())
    if parse:
        problem = f"parse error: {problem}"
    if locations:
        return f"{locations[-1].group('file')}:{locations[-1].group('line')}: {problem}"
    return f"{file}: {problem}" if file else problem
