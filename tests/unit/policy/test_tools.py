"""policy.tools and policy.explain over in-memory policies: test discovery and outcomes, decision paths, the
``allowed`` rule, error compaction and the explanation of one decision."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from policy.engine import UNDEFINED, PolicyLoadError
from policy.explain import explain, explanation_json, render_text
from policy.tools import (
    PolicySet,
    allowed_of,
    compact_error,
    find_tests,
    make_engine,
    normalize_decision,
    ref_text,
    rule_defs,
    run_tests,
    to_json,
)

SHIPPED = Path(__file__).resolve().parents[3] / "policy" / "rego"

POLICY = """\
package app.authz

import rego.v1

default allow := false

allow if {
	input.user == "alice"
	input.method == "GET"
}

admin if "admin" in input.roles

labels contains "read" if input.method == "GET"
"""

TESTS = """\
package app.authz_test

import rego.v1

import data.app.authz

test_alice_reads if authz.allow with input as {"user": "alice", "method": "GET"}

test_bob_reads if authz.allow with input as {"user": "bob", "method": "GET"}

test_labels_are_a_set if authz.labels == {"read"} with input as {"method": "GET"}

test_value_is_not_true := 5

test_divides if {
	print("dividing by", input_zero)
	1 / input_zero == 1
}

input_zero := 0

helper_test_not_a_test if true

test_function(x) := x
"""


def policies(*modules: tuple[str, str], data: dict[str, Any] | None = None) -> PolicySet:
    return PolicySet(modules=tuple(modules), data=data or {})


def test_tests_are_rules_named_test_in_any_package_but_not_functions() -> None:
    engine = make_engine(policies(("p.rego", POLICY), ("p_test.rego", TESTS)))
    cases = find_tests(rule_defs(engine))
    assert [case.path for case in cases] == [
        "data.app.authz_test.test_alice_reads",
        "data.app.authz_test.test_bob_reads",
        "data.app.authz_test.test_labels_are_a_set",
        "data.app.authz_test.test_value_is_not_true",
        "data.app.authz_test.test_divides",
    ]
    assert (cases[0].file, cases[0].line) == ("p_test.rego", 7)


def test_outcomes_pass_fail_error() -> None:
    report = run_tests(policies(("p.rego", POLICY), ("p_test.rego", TESTS)))
    outcomes = {result.case.name: (result.outcome, result.message) for result in report.results}
    assert outcomes == {
        "test_alice_reads": ("PASS", ""),
        "test_bob_reads": ("FAIL", "got undefined, want true"),
        "test_labels_are_a_set": ("PASS", ""),
        "test_value_is_not_true": ("FAIL", "got 5, want true"),
        "test_divides": ("ERROR", "p_test.rego:17: divide by zero"),
    }
    divides = report.results[-1]
    assert "1 / input_zero" in divides.detail  # the engine's excerpt, for -v
    assert divides.prints == ("p_test.rego:16: dividing by 0",)
    assert (report.count("PASS"), report.count("FAIL"), report.count("ERROR"), report.ok) == (2, 2, 1, False)
    assert all(result.duration_ms >= 0 for result in report.results)


def test_no_tests_is_not_ok() -> None:
    report = run_tests(policies(("p.rego", POLICY)))
    assert (report.results, report.ok) == ((), False)


def test_the_shipped_policy_passes_its_own_tests() -> None:
    modules = tuple((f"policy/rego/{name}", (SHIPPED / name).read_text()) for name in ("authz.rego", "authz_test.rego"))
    report = run_tests(policies(*modules, data=json.loads((SHIPPED / "data.json").read_text())))
    assert report.ok, [(r.case.name, r.outcome, r.message) for r in report.results if r.outcome != "PASS"]
    assert len(report.results) >= 15


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("package p\nimport rego.v1\nallow if {\n  input.x ==\n}\n", "bad.rego:5: expecting expression"),
        ("package p\nallow { true }\n", "bad.rego:2: `if` keyword is required before rule body"),
    ],
)
def test_a_module_that_does_not_load_is_one_file_line_message(source: str, message: str) -> None:
    with pytest.raises(PolicyLoadError) as caught:
        make_engine(policies(("bad.rego", source)))
    assert str(caught.value) == message


def test_rego_v0_modules_load_when_the_bundle_says_so() -> None:
    legacy = PolicySet(modules=(("v0.rego", "package p\ntest_x { true }\n"),), data={}, rego_version=0)
    assert run_tests(legacy).ok


def test_compact_error_without_a_location() -> None:
    assert compact_error("\nsomething broke\n") == "something broke"
    assert compact_error("error: bad data", default_file="x.rego") == "x.rego: bad data"
    text = "\n--> a.rego:10:16\n   |\n10 | x\n   |  ^\nerror: divide by zero"
    assert compact_error(text) == "a.rego:10: divide by zero"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("meshgate/authz/allow", "meshgate/authz/allow"),
        ("/envoy/authz/allow/", "envoy/authz/allow"),
        ("data.envoy.authz.allow", "envoy/authz/allow"),
        ("a/b-c/d", "a/b-c/d"),
    ],
)
def test_decision_paths(text: str, expected: str) -> None:
    assert normalize_decision(text) == expected


@pytest.mark.parametrize("text", ["allow", "", "data.x", "a/b c", "a/1b", "a//"])
def test_decision_paths_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="not a rule path"):
        normalize_decision(text)


def test_references_quote_what_is_not_an_identifier() -> None:
    assert ref_text(("data", "a", "b-c", "d")) == 'data.a["b-c"].d'


@pytest.mark.parametrize(
    ("value", "allowed", "problem"),
    [
        (True, True, ""),
        (False, False, ""),
        (UNDEFINED, False, ""),
        ({"allowed": True, "headers": {"x-user": "a"}}, True, ""),
        ({"allowed": False, "http_status": 401}, False, ""),
        ("yes", False, "invalid result: expected a boolean or an object, got a string"),
        ({"allowed": "true"}, False, 'invalid result: "allowed" must be a boolean, got a string'),
    ],
)
def test_allowed_follows_the_contract(value: object, allowed: bool, problem: str) -> None:
    assert allowed_of(value) == (allowed, problem)


def test_sets_become_sorted_arrays_in_rego_order() -> None:
    assert to_json({"b", "a"}) == ["a", "b"]
    assert to_json({10, 9, 1.5}) == [1.5, 9, 10]
    assert to_json({"k": {"x", None, True, 2}}) == {"k": [None, True, 2, "x"]}
    assert to_json([{"z"}, ("t",)]) == [["z"], ["t"]]


# --------------------------------------------------------------------------------------------- explain


def test_explain_reports_fired_and_not_fired_rules_with_lines() -> None:
    explanation = explain(policies(("p.rego", POLICY)), "app/authz/allow", {"user": "bob", "method": "GET"})
    assert explanation.value is False
    fired = {report.rule: report.value for report in explanation.fired}
    assert fired == {"data.app.authz.allow": False, "data.app.authz.labels": ["read"]}
    not_fired = {report.rule: report for report in explanation.not_fired}
    assert set(not_fired) == {"data.app.authz.admin"}
    # The decision never looked at `admin`: no line of it ran.
    assert not_fired["data.app.authz.admin"].covered == ()
    allow = next(report for report in explanation.fired if report.rule == "data.app.authz.allow")
    assert 8 in allow.covered  # `input.user == "alice"` ran (and failed) ...
    assert 9 not in allow.covered  # ... so the method check was never reached
    document = explanation_json(explanation)
    assert document["fired"][0] == {
        "rule": "data.app.authz.allow",
        "file": "p.rego",
        "line": 5,
        "value": False,
        "evaluated": True,
        "covered": list(allow.covered),
        "not_covered": list(allow.not_covered),
    }
    assert document["coverage"]["p.rego"]["covered"]


def test_explain_text_says_where_a_rule_stopped() -> None:
    modules = tuple((f"policy/rego/{name}", (SHIPPED / name).read_text()) for name in ("authz.rego",))
    shipped = policies(*modules, data=json.loads((SHIPPED / "data.json").read_text()))
    document = {
        "attributes": {"request": {"http": {"method": "POST", "path": "/orders"}}},
        "parsed_path": ["orders"],
        "meshgate": {"route": "orders-write", "principal": {"sub": "a", "roles": ["orders.read"]}},
    }
    explanation = explain(shipped, "meshgate/authz/allow", document)
    text = render_text(explanation)
    assert text.splitlines()[0].startswith('data.meshgate.authz.allow = {"allowed": false')
    assert 'meshgate.authz.required_roles = ["orders.write"]' in text
    assert "meshgate.authz.grant_reason  stopped at line" in text
    assert "count(held) > 0" in text  # the condition that did not hold, quoted from the source


def test_explain_includes_rules_of_other_packages_the_decision_used() -> None:
    library = 'package lib\n\nimport rego.v1\n\nis_admin if input.role == "admin"\n'
    other = "package other\n\nimport rego.v1\n\nnever := 1\n"
    main = "package main\n\nimport rego.v1\n\nimport data.lib\n\nallow if lib.is_admin\n"
    modules = policies(("lib.rego", library), ("other.rego", other), ("main.rego", main))
    explanation = explain(modules, "main/allow", {"role": "user"})
    rules = {report.rule for report in explanation.fired + explanation.not_fired}
    assert rules == {"data.main.allow", "data.lib.is_admin"}


def test_explain_records_an_evaluation_error() -> None:
    source = "package p\n\nimport rego.v1\n\nallow if 1 / input.n == 1\n"
    explanation = explain(policies(("p.rego", source)), "p/allow", {"n": 0})
    assert explanation.value is UNDEFINED
    assert explanation.error == "p.rego:5: divide by zero"
    assert "error: p.rego:5: divide by zero" in render_text(explanation)
