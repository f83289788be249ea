"""What ``meshgate policy test`` and ``meshgate policy eval`` do, without the printing: run a directory's
``test_*`` rules, evaluate a bundle's decision for one input, and explain which rules fired.

Everything evaluates with regorus, the engine the gateway embeds, so a test that passes here passes in the gateway.
The argparse wiring and the output live in ``gateway/policy_cli.py``; this module returns values and raises
``PolicyLoadError`` (message ``path:line: problem``) for a policy that cannot be loaded.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from policy.decision import InvalidResult, parse_result
from policy.engine import UNDEFINED, PolicyLoadError, rule_path

if TYPE_CHECKING:
    from policy.bundle import Bundle


__all__ = [
    "Outcome",
    "PolicySet",
    "RuleDef",
    "TestCase",
    "TestReport",
    "TestResult",
    "allowed_of",
    "compact_error",
    "find_tests",
    "load_policy_set",
    "make_engine",
    "normalize_decision",
    "policy_set",
    "ref_text",
    "rule_defs",
    "run_tests",
    "to_json",
    "value_of",
]

Outcome = Literal["PASS", "FAIL", "ERROR"]

# regorus error text: "\n--> file.rego:12:5\n   |\n12 | <source>\n   |     ^\nerror: <problem>"
_LOCATION = re.compile(r"-->\s*(?P<file>.+?):(?P<line>\d+):\d+")
_PROBLEM = re.compile(r"^error:\s*(?P<message>.+)$", re.MULTILINE)
_DECISION_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Rego modules and data as regorus takes them: ``modules`` are ``(name, text)``, names as errors show them."""

    modules: tuple[tuple[str, str], ...]
    data: Mapping[str, Any]
    rego_version: int = 1
    revision: str = ""


@dataclass(frozen=True, slots=True)
class RuleDef:
    """One definition of a rule (a rule may have several: incremental rules, a default, several bodies)."""

    package: tuple[str, ...]  # ("meshgate", "authz")
    name: str  # the first segment of the head: "allow" for `allow`, "obj" for `obj["k"] := 1`
    file: str
    line: int  # first line of the definition
    last_line: int
    function: bool  # `f(x) := ...`: has no value of its own
    default: bool

    @property
    def path(self) -> str:
        return ref_text(("data", *self.package, self.name))


@dataclass(frozen=True, slots=True)
class TestCase:
    package: tuple[str, ...]
    name: str
    file: str
    line: int

    @property
    def path(self) -> str:
        return ref_text(("data", *self.package, self.name))


@dataclass(frozen=True, slots=True)
class TestResult:
    case: TestCase
    outcome: Outcome
    duration_ms: float
    message: str = ""  # FAIL: what the rule was instead of true; ERROR: "file:line: problem"
    detail: str = ""  # ERROR: the engine's full message, with the source excerpt
    prints: tuple[str, ...] = ()  # what the test's print() calls wrote


@dataclass(frozen=True, slots=True)
class TestReport:
    results: tuple[TestResult, ...] = field(default_factory=tuple)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for result in self.results if result.outcome == outcome)

    @property
    def ok(self) -> bool:
        """At least one test and every test passed: "no tests" is a failure, as an empty suite is usually a typo."""
        return bool(self.results) and self.count("PASS") == len(self.results)


# --------------------------------------------------------------------------------------------- loading


def load_policy_set(directory: Path, *, with_tests: bool) -> PolicySet:
    """A bundle directory as a ``PolicySet`` via ``policy.bundle.load_bundle``, so data files, the manifest and
    ``rego_version`` mean here what they mean in the gateway."""
    from policy.bundle import load_bundle

    return policy_set(load_bundle(directory), directory, with_tests=with_tests)


def policy_set(bundle: Bundle, directory: Path, *, with_tests: bool) -> PolicySet:
    """``bundle`` (loaded from ``directory``) as a ``PolicySet``; module names are prefixed with ``directory`` so
    errors name files as the user wrote them."""
    modules = tuple(bundle.modules) + (tuple(bundle.tests) if with_tests else ())
    return PolicySet(
        modules=tuple((_display_name(directory, name), text) for name, text in modules),
        data=bundle.data,
        rego_version=bundle.rego_version,
        revision=bundle.revision,
    )


def _display_name(directory: Path, name: str) -> str:
    if Path(name).is_absolute() or Path(name).parts[: len(directory.parts)] == directory.parts:
        return name
    return str(directory / name)


def make_engine(policies: PolicySet) -> Any:
    """A regorus ``Engine`` holding ``policies``, or ``PolicyLoadError`` naming the first file that does not parse."""
    engine = _regorus().Engine()
    engine.set_rego_v0(policies.rego_version == 0)
    for name, text in policies.modules:
        try:
            engine.add_policy(name, text)
        except RuntimeError as error:
            raise PolicyLoadError(compact_error(str(error), default_file=name)) from None
    try:
        engine.add_data(dict(policies.data))
    except RuntimeError as error:
        raise PolicyLoadError(f"data: {compact_error(str(error))}") from None
    return engine


def _regorus() -> Any:
    """The regorus module, imported on first use: the CLI parses its arguments without loading the extension."""
    # The machine may set RUST_BACKTRACE=1, which appends a Rust backtrace to every error message.
    os.environ["RUST_BACKTRACE"] = "0"
    import regorus  # type: ignore[import-untyped]

    return regorus


def compact_error(message: str, *, default_file: str = "") -> str:
    """regorus' multi-line error (source excerpt and caret) -> one ``file:line: problem`` line."""
    location = _LOCATION.search(message)
    problems = _PROBLEM.findall(message)
    problem = problems[-1].strip() if problems else _first_line(message)
    if location:
        return f"{location['file']}:{location['line']}: {problem}"
    return f"{default_file}: {problem}" if default_file else problem


def _first_line(message: str) -> str:
    return next((line.strip() for line in message.splitlines() if line.strip()), "unknown error")


# --------------------------------------------------------------------------------------------- the AST


def rule_defs(engine: Any) -> list[RuleDef]:
    """Every rule definition of every module the engine holds, in file order, read from regorus' JSON AST."""
    defs: list[RuleDef] = []
    for module in json.loads(engine.get_ast_as_json()):
        file = module["source"]["file"]
        encoded = module["source"]["contents"].encode()
        package = tuple(_ref_segments(module["ast"]["package"]["refr"]))
        for rule in module["ast"]["rules"]:
            kind, body = next(iter(rule.items()))
            if kind == "Default":
                head_kind, ref = "Default", body["refr"]
            else:
                head_kind, head = next(iter(body["head"].items()))
                ref = head["refr"]
            span = body["span"]
            segments = _ref_segments(ref)
            defs.append(
                RuleDef(
                    package=package,
                    name=segments[0] if segments else "",
                    file=file,
                    line=span["line"],
                    # spans are byte offsets into the module text
                    last_line=span["line"] + encoded[span["start"] : span["end"]].count(b"\n"),
                    function=head_kind == "Func" or bool(body.get("args")),
                    default=kind == "Default",
                )
            )
    return defs


def ref_text(segments: Iterable[str]) -> str:
    """``("data", "a", "b-c")`` -> ``data.a["b-c"]``: a reference regorus and OPA both parse."""
    parts: list[str] = []
    for segment in segments:
        if _IDENTIFIER.fullmatch(segment):
            parts.append(f".{segment}" if parts else segment)
        else:
            parts.append(f"[{json.dumps(segment)}]")
    return "".join(parts)


def _ref_segments(ref: Mapping[str, Any]) -> list[str]:
    """``a.b["c"]`` as a Var / RefDot / RefBrack chain -> ``["a", "b", "c"]`` (a non-string index stops it)."""
    kind, node = next(iter(ref.items()))
    if kind == "Var":
        return [node["value"]]
    if kind == "RefDot":
        return [*_ref_segments(node["refr"]), node["field"][1]]
    if kind == "RefBrack":
        index_kind, index = next(iter(node["index"].items()))
        head = _ref_segments(node["refr"])
        return [*head, index["value"]] if index_kind == "String" else head
    return []


# --------------------------------------------------------------------------------------------- policy test


def find_tests(defs: Iterable[RuleDef]) -> list[TestCase]:
    """Rules named ``test_*`` (not functions), once per package and name, in file order."""
    seen: set[tuple[tuple[str, ...], str]] = set()
    cases: list[TestCase] = []
    for rule in defs:
        if rule.function or not rule.name.startswith("test_") or (rule.package, rule.name) in seen:
            continue
        seen.add((rule.package, rule.name))
        cases.append(TestCase(rule.package, rule.name, rule.file, rule.line))
    return cases


def run_tests(policies: PolicySet) -> TestReport:
    """Evaluate every test rule of ``policies``: PASS when its value is ``true``, FAIL otherwise (false, undefined,
    any other value), ERROR when evaluation fails. Raises ``PolicyLoadError`` if a module does not parse."""
    engine = make_engine(policies)
    engine.set_gather_prints(True)
    results: list[TestResult] = []
    for case in find_tests(rule_defs(engine)):
        started = time.perf_counter()
        try:
            value = value_of(engine, case.path)
        except RuntimeError as error:
            elapsed = (time.perf_counter() - started) * 1000
            message = compact_error(str(error), default_file=case.file)
            results.append(TestResult(case, "ERROR", elapsed, message, str(error).strip(), _prints(engine)))
            continue
        elapsed = (time.perf_counter() - started) * 1000
        if value is True:
            results.append(TestResult(case, "PASS", elapsed, prints=_prints(engine)))
        else:
            got = "undefined" if value is UNDEFINED else json.dumps(value)
            results.append(TestResult(case, "FAIL", elapsed, f"got {got}, want true", prints=_prints(engine)))
    return TestReport(tuple(results))


def _prints(engine: Any) -> tuple[str, ...]:
    return tuple(str(line) for line in engine.take_prints())


# --------------------------------------------------------------------------------------------- policy eval


def normalize_decision(text: str) -> str:
    """``meshgate/authz/allow``, ``/meshgate/authz/allow`` or ``data.meshgate.authz.allow`` ->
    ``meshgate/authz/allow``; ``ValueError`` for anything that is not a rule path."""
    raw = text.strip()
    parts = raw.removeprefix("data.").split(".") if raw.startswith("data.") else list(rule_path(raw))
    if len(parts) < 2 or not all(_DECISION_SEGMENT.fullmatch(part) for part in parts):
        raise ValueError(f"{text!r} is not a rule path like meshgate/authz/allow")
    return "/".join(parts)


def allowed_of(value: object) -> tuple[bool, str]:
    """What the gateway would do with ``value`` (CONTRACT 5): ``(allowed, problem)``. A boolean is itself, an
    object its ``allowed``, undefined a deny; a value the gateway rejects is a deny with the problem named."""
    try:
        return parse_result(value).allowed, ""
    except InvalidResult as error:
        return False, f"invalid result: {error}"


def to_json(value: object) -> object:
    """A regorus value as JSON types: sets become sorted arrays, as OPA serializes them."""
    if isinstance(value, set | frozenset):
        return [to_json(item) for item in sorted(value, key=_rego_order)]
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): to_json(item) for key, item in value.items()}
    return value


def _rego_order(value: object) -> tuple[int, str]:
    """Rego's order across types (null < boolean < number < string < array < object < set), then by JSON text."""
    if value is None:
        rank = 0
    elif isinstance(value, bool):
        rank = 1
    elif isinstance(value, int | float):
        return (2, f"{float(value):+030.10f}")  # numeric order, not text order
    elif isinstance(value, str):
        return (3, value)
    else:
        rank = 4 if isinstance(value, list | tuple) else 5 if isinstance(value, Mapping) else 6
    return (rank, json.dumps(to_json(value), sort_keys=True))


def value_of(engine: Any, path: str) -> object:
    """The value of ``path`` (``data.a.b``) in ``engine`` for the input it holds (JSON types), ``UNDEFINED``, or
    ``RuntimeError``. A query, not ``eval_rule``: that answers None for both undefined and null."""
    answer = engine.eval_query(path)["result"]
    return to_json(answer[0]["expressions"][0]["value"]) if answer else UNDEFINED
