"""``meshgate policy eval --explain``: which rules had a value for one input, which did not, and which lines ran.

The decision is evaluated once with regorus' coverage on: the covered lines are the ones that evaluation touched,
the not-covered ones it reached in a rule but did not get past. Then every value rule of the decision's package
(and every rule elsewhere with a covered line: what the decision depended on) is evaluated on its own for its
value. "Fired" means "has a value for this input", which is what a policy author asks first; the lines say why.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from policy.engine import UNDEFINED, rule_path
from policy.tools import PolicySet, RuleDef, compact_error, make_engine, ref_text, rule_defs, value_of

__all__ = ["Explanation", "RuleReport", "explain", "explanation_json", "render_text"]

_VALUE_WIDTH = 100  # the text rendering shortens longer values; the JSON carries them whole


@dataclass(frozen=True, slots=True)
class RuleReport:
    rule: str  # data.meshgate.authz.allow
    file: str
    line: int  # the first definition's first line
    value: object  # UNDEFINED when the rule has no value for this input
    error: str  # evaluating the rule on its own failed ("" when it did not)
    covered: tuple[int, ...]  # lines of its definitions the decision's evaluation ran
    not_covered: tuple[int, ...]  # lines of its definitions that evaluation reached but did not complete
    stopped_at: tuple[int, ...]  # per definition that ran without a value: its last line that ran

    @property
    def fired(self) -> bool:
        return self.value is not UNDEFINED


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: str
    value: object
    error: str
    fired: tuple[RuleReport, ...]
    not_fired: tuple[RuleReport, ...]
    coverage: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]  # file -> (covered, not covered)
    sources: Mapping[str, Sequence[str]]  # file -> its lines, to quote them


def explain(policies: PolicySet, decision: str, input: Mapping[str, Any]) -> Explanation:
    """Evaluate ``decision`` for ``input`` over ``policies`` (no tests) and report rule by rule."""
    engine = make_engine(policies)
    engine.set_input(dict(input))
    decision_path = ref_text(("data", *rule_path(decision)))
    engine.set_enable_coverage(True)
    value, error = _evaluate(engine, decision_path)
    coverage = _coverage(json.loads(engine.get_coverage_report_as_json()))
    # The per-rule evaluations below must not count as "what the decision ran".
    engine.set_enable_coverage(False)
    engine.clear_coverage_data()

    package = rule_path(decision)[:-1]
    fired: list[RuleReport] = []
    not_fired: list[RuleReport] = []
    for path, defs in _select(rule_defs(engine), package, coverage).items():
        rule_value, rule_error = _evaluate(engine, path)
        report = _report(path, defs, rule_value, rule_error, coverage)
        (fired if report.fired else not_fired).append(report)
    return Explanation(
        decision=decision_path,
        value=value,
        error=error,
        fired=tuple(fired),
        not_fired=tuple(not_fired),
        coverage={file: (tuple(sorted(c)), tuple(sorted(n))) for file, (c, n) in coverage.items()},
        sources={name: text.splitlines() for name, text in policies.modules},
    )


def _evaluate(engine: Any, path: str) -> tuple[object, str]:
    try:
        return value_of(engine, path), ""
    except RuntimeError as error:
        return UNDEFINED, compact_error(str(error))


def _coverage(report: Mapping[str, Any]) -> dict[str, tuple[set[int], set[int]]]:
    return {
        entry["path"]: (set(entry.get("covered", ())), set(entry.get("not_covered", ())))
        for entry in report.get("files", ())
    }


def _select(
    defs: Sequence[RuleDef], package: tuple[str, ...], coverage: Mapping[str, tuple[set[int], set[int]]]
) -> dict[str, list[RuleDef]]:
    """Every value rule of ``package``, and rules of other packages with a covered line, by path in file order."""
    selected: dict[str, list[RuleDef]] = {}
    for rule in defs:
        if rule.function or rule.name.startswith("test_"):
            continue
        covered = coverage.get(rule.file, (set(), set()))[0]
        if rule.package == package or any(line in covered for line in range(rule.line, rule.last_line + 1)):
            selected.setdefault(rule.path, []).append(rule)
    return selected


def _report(
    path: str,
    defs: Sequence[RuleDef],
    value: object,
    error: str,
    coverage: Mapping[str, tuple[set[int], set[int]]],
) -> RuleReport:
    covered: set[int] = set()
    not_covered: set[int] = set()
    stopped: list[int] = []
    for rule in defs:
        lines = set(range(rule.line, rule.last_line + 1))
        ran, missed = (lines & part for part in coverage.get(rule.file, (set(), set())))
        covered |= ran
        not_covered |= missed
        if value is UNDEFINED and ran and not rule.default:
            stopped.append(max(ran))
    first = defs[0]
    return RuleReport(
        rule=path,
        file=first.file,
        line=first.line,
        value=value,
        error=error,
        covered=tuple(sorted(covered)),
        not_covered=tuple(sorted(not_covered)),
        stopped_at=tuple(sorted(stopped)),
    )


def explanation_json(explanation: Explanation) -> dict[str, Any]:
    """The ``explain`` object of ``policy eval --explain``."""

    def rule(report: RuleReport) -> dict[str, Any]:
        entry: dict[str, Any] = {"rule": report.rule, "file": report.file, "line": report.line}
        if report.fired:
            entry["value"] = report.value
        if report.error:
            entry["error"] = report.error
        entry["evaluated"] = bool(report.covered)
        entry["covered"] = list(report.covered)
        entry["not_covered"] = list(report.not_covered)
        return entry

    return {
        "fired": [rule(report) for report in explanation.fired],
        "not_fired": [rule(report) for report in explanation.not_fired],
        "coverage": {
            file: {"covered": list(covered), "not_covered": list(missed)}
            for file, (covered, missed) in explanation.coverage.items()
        },
    }


def render_text(explanation: Explanation) -> str:
    """The same, for a person: one line per rule with its value, or where its evaluation stopped."""
    lines = [f"{explanation.decision} = {_short(explanation.value, width=None)}"]
    if explanation.error:
        lines.append(f"  error: {explanation.error}")
    width = max((len(_where(r)) for r in explanation.fired + explanation.not_fired), default=0)
    lines.append("fired (a value for this input):")
    lines.extend(f"  {_where(r):<{width}}  {_name(r)} = {_short(r.value)}" for r in explanation.fired)
    if not explanation.fired:
        lines.append("  (none)")
    lines.append("not fired (undefined for this input):")
    for report in explanation.not_fired:
        lines.append(f"  {_where(report):<{width}}  {_name(report)}{_why(report, explanation.sources)}")
    if not explanation.not_fired:
        lines.append("  (none)")
    return "\n".join(lines)


def _where(report: RuleReport) -> str:
    return f"{report.file}:{report.line}"


def _name(report: RuleReport) -> str:
    return report.rule.removeprefix("data.")


def _why(report: RuleReport, sources: Mapping[str, Sequence[str]]) -> str:
    if report.error:
        return f"  error: {report.error}"
    if not report.covered:
        return "  (not evaluated for this decision)"
    source = sources.get(report.file, ())
    quoted = [f"line {line}: {_quote(source, line)}" for line in report.stopped_at]
    return f"  stopped at {'; '.join(quoted)}" if quoted else ""


def _quote(source: Sequence[str], line: int) -> str:
    return source[line - 1].strip() if 0 < line <= len(source) else "?"


def _short(value: object, width: int | None = _VALUE_WIDTH) -> str:
    text = "undefined" if value is UNDEFINED else json.dumps(value, sort_keys=True)
    return text if width is None or len(text) <= width else text[: width - 3] + "..."
